use super::*;

fn int(n: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(n)),
    }
}

fn text(s: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(s.to_owned())),
    }
}

fn flag(b: bool) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::BoolParam(b)),
    }
}

fn of(pairs: &[(&str, InferParameter)]) -> HashMap<String, InferParameter> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), value.clone()))
        .collect()
}

fn none(_: &str) -> bool {
    false
}

/// A value of the parameter that asks for something (not its default).
fn asking(name: &str) -> InferParameter {
    match name {
        SEQUENCE_START | SEQUENCE_END | BINARY_DATA_OUTPUT | BINARY_DATA | EMPTY_FINAL_RESPONSE => {
            flag(true)
        }
        SHARED_MEMORY_REGION => text("region"),
        _ => int(3),
    }
}

/// Every parameter the protocol defines, set where it belongs with a value that asks
/// for something: implemented ones are read, the others refused naming the parameter
/// with the code their support says.
#[test]
fn every_protocol_parameter_is_honoured_or_refused_by_name() {
    for known in KNOWN {
        let mut set = vec![(known.name, asking(known.name))];
        if matches!(known.name, SEQUENCE_START | SEQUENCE_END) {
            set.push((SEQUENCE_ID, int(7)));
        }
        let parameters = of(&set);
        let outcome = match known.place {
            Place::Request => read_request(&parameters, none).map(|_| ()),
            Place::Input => check_input("x", &parameters),
            Place::Output => read_output("y", &parameters).map(|_| ()),
        };
        match (known.support, outcome) {
            (Support::Implemented, Ok(())) => {}
            (
                Support::OnlyDefault(..) | Support::Refused(_) | Support::ResolvedFirst(_),
                Err(e),
            ) => {
                assert_eq!(e.name, known.name);
                assert!(
                    e.to_string()
                        .starts_with(&format!("parameter \"{}\"", known.name))
                );
            }
            (support, outcome) => panic!("{}: {support:?} but {outcome:?}", known.name),
        }
    }
}

#[test]
fn parameters_that_ask_for_nothing_are_accepted() {
    let parameters = of(&[(PRIORITY, int(0)), (EMPTY_FINAL_RESPONSE, flag(false))]);
    assert_eq!(
        read_request(&parameters, none),
        Ok(RequestParameters::default())
    );
    let refused = read_request(&of(&[(PRIORITY, int(2))]), none).expect_err("priority 2");
    assert_eq!(
        refused.to_string(),
        "parameter \"priority\": Aviary has no priority levels: every request is served in \
         arrival order (only 0 is accepted)"
    );
}

#[test]
fn unknown_parameters_are_refused_unless_the_caller_knows_them() {
    let parameters = of(&[("user", text("bob"))]);
    let refused = read_request(&parameters, none).expect_err("unknown");
    assert!(
        refused
            .to_string()
            .starts_with("parameter \"user\": not a parameter Aviary knows")
    );
    assert_eq!(
        read_request(&parameters, |name| name == "user"),
        Ok(RequestParameters::default())
    );
    let refused = check_input("x", &of(&[("scale", int(2))])).expect_err("unknown");
    assert!(
        refused
            .to_string()
            .starts_with("parameter \"scale\" of input \"x\": "),
        "{refused}"
    );
    let misplaced = read_output("y", &of(&[(SEQUENCE_ID, int(1))])).expect_err("misplaced");
    assert_eq!(
        misplaced.to_string(),
        "parameter \"sequence_id\" of output \"y\": it is a request parameter, not a tensor's"
    );
}

#[test]
fn sequences_are_read_with_integer_or_string_ids() {
    let read = read_request(
        &of(&[(SEQUENCE_ID, int(42)), (SEQUENCE_START, flag(true))]),
        none,
    )
    .expect("valid");
    assert_eq!(
        read.sequence,
        Some(Sequence {
            id: SequenceId::Number(42),
            start: true,
            end: false
        })
    );
    let read = read_request(
        &of(&[(SEQUENCE_ID, text("chat-7")), (SEQUENCE_END, flag(true))]),
        none,
    )
    .expect("valid");
    assert_eq!(
        read.sequence.map(|s| (s.id, s.end)),
        Some((SequenceId::Text("chat-7".into()), true))
    );
    // 0 and "" are no sequence, as in Triton.
    for id in [int(0), text("")] {
        assert_eq!(
            read_request(&of(&[(SEQUENCE_ID, id)]), none).map(|r| r.sequence),
            Ok(None)
        );
    }
    let refused = read_request(&of(&[(SEQUENCE_START, flag(true))]), none).expect_err("no id");
    assert!(
        refused.to_string().contains("without a sequence_id"),
        "{refused}"
    );
    let refused = read_request(&of(&[(SEQUENCE_ID, flag(true))]), none).expect_err("a bool");
    assert!(refused.to_string().contains("not a bool"), "{refused}");
    let refused = read_request(&of(&[(SEQUENCE_ID, int(-1))]), none).expect_err("negative");
    assert!(refused.to_string().contains("negative"), "{refused}");
}

#[test]
fn timeout_is_read_in_microseconds() {
    let read = read_request(&of(&[(TIMEOUT, int(1500))]), none).expect("valid");
    assert_eq!(read.timeout, Some(Duration::from_micros(1500)));
    let read = read_request(&of(&[(TIMEOUT, int(0))]), none).expect("valid");
    assert_eq!(read.timeout, None, "0 is no timeout, as in Triton");
    assert!(read_request(&of(&[(TIMEOUT, text("1s"))]), none).is_err());
    assert!(read_request(&of(&[(TIMEOUT, int(-5))]), none).is_err());
}

#[test]
fn classification_needs_a_positive_count() {
    assert_eq!(
        read_output("y", &of(&[(CLASSIFICATION, int(3))])),
        Ok(Some(3))
    );
    assert_eq!(read_output("y", &HashMap::new()), Ok(None));
    for bad in [int(0), int(-1), text("3")] {
        let refused = read_output("y", &of(&[(CLASSIFICATION, bad)])).expect_err("refused");
        assert!(
            refused
                .to_string()
                .starts_with("parameter \"classification\" of output \"y\""),
            "{refused}"
        );
    }
}
