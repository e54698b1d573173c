//! Dynamic batching through the real `aviary serve` on 127.0.0.1 port 0: a version
//! whose model card asks for batching answers each caller with exactly its own rows
//! (the same bytes as the same model unbatched), a bad request in a batch fails alone,
//! a request whose deadline passes while its batch forms is dropped, and the batching
//! shows in `ModelConfig` and in the execution count.

mod support;

use aviary::pb::inference::{
    ModelConfigRequest, ModelInferRequest, ModelInferResponse, ModelStatisticsRequest,
    model_config::SchedulingChoice, model_infer_request::InferInputTensor,
};
use support::*;
use tonic::Code;

/// How long the first request of a batch waits for others.
const DELAY_US: u64 = 300_000;

/// A repository with `model`'s model twice: version 1 batching (`card`), version 2 as
/// is.
fn repository(model: &str, source: &str, card: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for version in ["1", "2"] {
        let folder = dir.path().join(model).join(version);
        std::fs::create_dir_all(&folder).expect("version folder");
        std::fs::copy(repo_root().join(source), folder.join("model.onnx")).expect("model copy");
    }
    std::fs::write(dir.path().join(model).join("1/model.toml"), card).expect("card");
    dir
}

fn config(repository: &tempfile::TempDir, model: &str, instances: usize) -> String {
    format!(
        "[repository]\npath = \"{}\"\ninstances = {instances}\n\n[routes.{model}]\nversions = [ {{ version = \"1\", weight = 1 }}, {{ version = \"2\", weight = 0 }} ]\n",
        repository.path().display()
    )
}

/// `rows` rows of slow-model inputs, different for each `seed`.
fn request(version: &str, rows: usize, seed: usize) -> ModelInferRequest {
    let values: Vec<f32> = (0..rows * SLOW_WIDTH)
        .map(|i| ((seed * 31 + i * 7) % 50) as f32 / 25.0 - 1.0)
        .collect();
    ModelInferRequest {
        model_name: "slow".into(),
        model_version: version.into(),
        id: format!("req-{seed}"),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, SLOW_WIDTH as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![aviary::tensor::to_raw(&values).into()],
        ..Default::default()
    }
}

/// What a response says, minus the version: id, outputs (name, shape) and their bytes.
type Answer = (String, Vec<(String, Vec<i64>)>, Vec<Vec<u8>>);

fn answer(response: &ModelInferResponse) -> Answer {
    (
        response.id.clone(),
        response
            .outputs
            .iter()
            .map(|o| (o.name.clone(), o.shape.clone()))
            .collect(),
        response
            .raw_output_contents
            .iter()
            .map(|r| r.to_vec())
            .collect(),
    )
}

fn statistics(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    model: &str,
    version: &str,
) -> aviary::pb::inference::ModelStatistics {
    runtime.block_on(async {
        client(connect(addr).await)
            .model_statistics(ModelStatisticsRequest {
                name: model.into(),
                version: version.into(),
            })
            .await
            .expect("statistics")
            .into_inner()
            .model_stats
            .remove(0)
    })
}

#[test]
fn each_caller_gets_exactly_its_own_rows_and_a_bad_request_fails_alone() {
    // One session, busy with a slow run while the requests below queue: when it frees,
    // they run as one batch.
    let repository = repository(
        "slow",
        "tests/slow-models/slow/1/model.onnx",
        &format!("[dynamic_batching]\nmax_batch_size = 64\nmax_queue_delay_us = {DELAY_US}\n"),
    );
    let served = Served::start(&config(&repository, "slow", 1), &[]);
    let runtime = runtime();
    let sizes: Vec<usize> = (0..8).map(|i| 1 + (i * 5) % 4).collect();
    let running = slow_requests_in_flight(&runtime, &served.addr, 1);
    let (batched, bad) = runtime.block_on(async {
        let channel = connect(&served.addr).await;
        let calls: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(seed, &rows)| {
                let mut client = client(channel.clone());
                tokio::spawn(async move { client.model_infer(request("1", rows, seed)).await })
            })
            .collect();
        // A request of the wrong width, sent while the others wait to be batched.
        let mut wrong = request("1", 1, 99);
        wrong.inputs[0].shape = vec![1, 3];
        wrong.raw_input_contents = vec![aviary::tensor::to_raw(&[1f32, 2.0, 3.0]).into()];
        let bad = client(channel.clone()).model_infer(wrong).await;
        let mut batched = Vec::new();
        for call in calls {
            batched.push(call.await.expect("task").expect("answered").into_inner());
        }
        (batched, bad)
    });
    for call in running {
        runtime
            .block_on(call)
            .expect("task")
            .expect("the first request is answered");
    }
    let bad = bad.expect_err("the wrong width is refused");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let stats = statistics(&runtime, &served.addr, "slow", "1");
    let rows: usize = sizes.iter().sum::<usize>() + SLOW_BATCH;
    assert_eq!(stats.inference_count, rows as u64, "every row counted");
    assert!(
        stats.execution_count < sizes.len() as u64,
        "requests queued behind a busy session ran in fewer batches: {stats:?}"
    );

    // The same requests one by one on the unbatched version: the same bytes.
    for (seed, (&rows, batched)) in sizes.iter().zip(&batched).enumerate() {
        let alone = runtime.block_on(async {
            client(connect(&served.addr).await)
                .model_infer(request("2", rows, seed))
                .await
                .expect("answered unbatched")
                .into_inner()
        });
        assert_eq!(batched.model_version, "1");
        assert_eq!(
            answer(batched),
            answer(&alone),
            "request {seed}: its own rows"
        );
    }
}

#[test]
fn a_request_whose_deadline_passes_while_it_waits_for_its_batch_is_dropped() {
    // The slow model (about 200 ms a run) batching on one session: a request waits in
    // the batcher while the session runs another.
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path().join("slow/1");
    std::fs::create_dir_all(&folder).expect("version folder");
    std::fs::copy(
        repo_root().join("tests/slow-models/slow/1/model.onnx"),
        folder.join("model.onnx"),
    )
    .expect("model copy");
    std::fs::write(
        folder.join("model.toml"),
        "[dynamic_batching]\nmax_batch_size = 64\nmax_queue_delay_us = 1000\n",
    )
    .expect("card");
    let config = format!(
        "[repository]\npath = \"{}\"\ninstances = 1\n\n[routes.slow]\nversions = [ {{ version = \"1\", weight = 1 }} ]\n",
        dir.path().display()
    );
    let served = Served::start(&config, &[]);
    let runtime = runtime();
    let running = slow_requests_in_flight(&runtime, &served.addr, 1);
    let status = runtime.block_on(async {
        let mut call = tonic::Request::new(slow_request());
        call.set_timeout(std::time::Duration::from_millis(100));
        client(connect(&served.addr).await)
            .model_infer(call)
            .await
            .expect_err("its deadline passes while the session is busy")
    });
    // The gateway answers DEADLINE_EXCEEDED 10 ms before the deadline; on a loaded
    // machine the client's own timer can fire first (CANCELLED, "Timeout expired").
    // Either way the request must not have run, which the count below checks.
    assert!(
        status.code() == Code::DeadlineExceeded
            || (status.code() == Code::Cancelled && status.message().contains("Timeout")),
        "{status:?}"
    );
    for call in running {
        runtime
            .block_on(call)
            .expect("task")
            .expect("the running request is answered");
    }
    let stats = statistics(&runtime, &served.addr, "slow", "1");
    assert_eq!(
        stats.inference_count, SLOW_BATCH as u64,
        "only the first request's rows ran: {stats:?}"
    );
}

#[test]
fn model_config_shows_the_batching() {
    let repository = repository(
        "demo",
        "tests/models/demo/1/model.onnx",
        &format!(
            "[dynamic_batching]\nmax_batch_size = 16\nmax_queue_delay_us = {DELAY_US}\npreferred_batch_sizes = [16]\n"
        ),
    );
    let served = Served::start(&config(&repository, "demo", 2), &[]);
    let runtime = runtime();
    let config = runtime.block_on(async {
        client(connect(&served.addr).await)
            .model_config(ModelConfigRequest {
                name: "demo".into(),
                version: "1".into(),
            })
            .await
            .expect("config")
            .into_inner()
            .config
            .expect("a config")
    });
    assert_eq!(config.max_batch_size, 16);
    assert_eq!(
        config.input[0].dims,
        [4],
        "dims without the batch dimension"
    );
    match config.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(batching)) => {
            assert_eq!(batching.max_queue_delay_microseconds, DELAY_US);
            assert_eq!(batching.preferred_batch_size, [16]);
        }
        other => panic!("no dynamic batching in {other:?}"),
    }
}
