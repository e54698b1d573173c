//! What a model name and a version name may be, checked in this one place by every
//! path that takes one: the admin API, Triton's repository RPCs, the repository scan
//! and watch, and the config file. A model name becomes a folder of the repository, so
//! the rules keep it one plain folder name: `[A-Za-z0-9_.-]`, at most 128 characters,
//! not starting with a dot (hidden folders, `.` and `..`), never containing `..`.

/// Longest model or version name.
pub const MAX_NAME_LEN: usize = 128;

/// Why `name` cannot be a model name, or `None` when it can.
pub fn model_name_problem(name: &str) -> Option<String> {
    name_problem(name)
}

/// Why `name` cannot be a version name, or `None` when it can (the same rules: a
/// version of the embedded worker is a folder too).
pub fn version_name_problem(name: &str) -> Option<String> {
    name_problem(name)
}

fn name_problem(name: &str) -> Option<String> {
    let problem = if name.is_empty() {
        "it is empty".to_owned()
    } else if name.len() > MAX_NAME_LEN {
        format!("it is longer than {MAX_NAME_LEN} characters")
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        match c {
            '/' | '\\' => "it contains a path separator".to_owned(),
            '\0' => "it contains a NUL character".to_owned(),
            c => format!("it contains {c:?} (letters, digits, '_', '.' and '-' only)"),
        }
    } else if name.starts_with('.') {
        "it starts with a dot".to_owned()
    } else if name.contains("..") {
        "it contains \"..\"".to_owned()
    } else {
        return None;
    };
    Some(problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_a_folder_or_hide_are_refused() {
        for (bad, why) in [
            ("", "empty"),
            ("..", "dot"),
            (".", "dot"),
            (".hidden", "dot"),
            ("../x", "separator"),
            ("/etc", "separator"),
            ("a/b", "separator"),
            ("a\\b", "separator"),
            ("x\0y", "NUL"),
            ("a..b", "\"..\""),
            ("my model", "' '"),
            ("modèle", "'è'"),
        ] {
            let problem = model_name_problem(bad).unwrap_or_else(|| panic!("{bad:?} passes"));
            assert!(problem.contains(why), "{bad:?}: {problem}");
        }
        assert!(model_name_problem(&"a".repeat(129)).is_some());
        for good in [
            "demo",
            "mlp",
            "a.b",
            "my-model_2",
            "1",
            "v2.1",
            &"a".repeat(128),
        ] {
            assert_eq!(model_name_problem(good), None, "{good:?}");
            assert_eq!(version_name_problem(good), None, "{good:?}");
        }
    }
}
