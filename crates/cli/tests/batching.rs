//! Dynamic batching through the real `aviary serve` on 127.0.0.1 port 0: a version
//! whose model card asks for batching answers each caller with exactly its own rows
//! (the same bytes as the same model unbatched), a bad request in a batch fails alone,
//! a request whose deadline passes while its batch forms is dropped, and the batching
//! shows in `ModelConfig` and in the execution count.

mod support;

use std::time::Duration;

use aviary::pb::inference::{
    ModelConfigRequest, ModelInferRequest, ModelInferResponse, ModelStatisticsRequest,
    model_config::SchedulingChoice, model_infer_request::InferInputTensor,
};
use support::*;
use tonic::Code;

/// How long the first request of a batch waits for others: long, so the concurrent
/// requests below surely meet in batches on a loaded machine.
const DELAY_US: u64 = 300_000;

/// A repository with the demo model twice: version 1 as is, version 2 batching.
fn repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = repo_root().join("tests/models/demo/1/model.onnx");
    for version in ["1", "2"] {
        let folder = dir.path().join("demo").join(version);
        std::fs::create_dir_all(&folder).expect("version folder");
        std::fs::copy(&model, folder.join("model.onnx")).expect("model copy");
    }
    std::fs::write(
        dir.path().join("demo/2/model.toml"),
        format!(
            "[dynamic_batching]\nmax_batch_size = 16\nmax_queue_delay_us = {DELAY_US}\npreferred_batch_sizes = [16]\n"
        ),
    )
    .expect("card");
    dir
}

fn config(repository: &tempfile::TempDir) -> String {
    format!(
        "[repository]\npath = \"{}\"\ninstances = 2\n\n[routes.demo]\nversions = [ {{ version = \"1\", weight = 1 }}, {{ version = \"2\", weight = 0 }} ]\n",
        repository.path().display()
    )
}

/// `rows` rows of demo inputs, different for each `seed`.
fn request(version: &str, rows: usize, seed: usize) -> ModelInferRequest {
    let values: Vec<f32> = (0..rows * 4)
        .map(|i| ((seed * 31 + i * 7) % 50) as f32 / 10.0)
        .collect();
    ModelInferRequest {
        model_name: "demo".into(),
        model_version: version.into(),
        id: format!("req-{seed}"),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 4],
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

#[test]
fn each_caller_gets_exactly_its_own_rows_and_a_bad_request_fails_alone() {
    let repository = repository();
    let served = Served::start(&config(&repository), &[]);
    let runtime = runtime();
    let sizes: Vec<usize> = (0..24).map(|i| 1 + (i * 5) % 4).collect();
    let (batched, bad, unbatched) = runtime.block_on(async {
        let channel = connect(&served.addr).await;
        let calls: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(seed, &rows)| {
                let mut client = client(channel.clone());
                tokio::spawn(async move { client.model_infer(request("2", rows, seed)).await })
            })
            .collect();
        // A request of the wrong width, sent while the others wait to be batched.
        let mut wrong = request("2", 1, 99);
        wrong.inputs[0].shape = vec![1, 3];
        wrong.raw_input_contents = vec![aviary::tensor::to_raw(&[1f32, 2.0, 3.0]).into()];
        let bad = client(channel.clone()).model_infer(wrong).await;
        let mut batched = Vec::new();
        for call in calls {
            batched.push(call.await.expect("task").expect("answered").into_inner());
        }
        let mut unbatched = Vec::new();
        for (seed, &rows) in sizes.iter().enumerate() {
            let response = client(channel.clone())
                .model_infer(request("1", rows, seed))
                .await
                .expect("answered unbatched");
            unbatched.push(response.into_inner());
        }
        (batched, bad, unbatched)
    });
    let bad = bad.expect_err("the wrong width is refused");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    for (batched, unbatched) in batched.iter().zip(&unbatched) {
        assert_eq!(batched.model_version, "2");
        assert_eq!(
            answer(batched),
            answer(unbatched),
            "the same rows as unbatched"
        );
    }

    let statistics = runtime.block_on(async {
        client(connect(&served.addr).await)
            .model_statistics(ModelStatisticsRequest {
                name: "demo".into(),
                version: "2".into(),
            })
            .await
            .expect("statistics")
            .into_inner()
    });
    let stats = &statistics.model_stats[0];
    let rows: usize = sizes.iter().sum();
    assert_eq!(stats.inference_count, rows as u64, "every row counted");
    assert!(
        stats.execution_count < sizes.len() as u64,
        "24 requests at once ran in fewer batches: {stats:?}"
    );
}

#[test]
fn a_request_whose_deadline_passes_while_its_batch_forms_is_dropped() {
    let repository = repository();
    let served = Served::start(&config(&repository), &[]);
    let runtime = runtime();
    let status = runtime.block_on(async {
        let mut call = tonic::Request::new(request("2", 1, 0));
        // Far less than the batch delay, and alone: its batch goes after the delay.
        call.set_timeout(Duration::from_millis(100));
        client(connect(&served.addr).await)
            .model_infer(call)
            .await
            .expect_err("its deadline passes first")
    });
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[test]
fn model_config_shows_the_batching() {
    let repository = repository();
    let served = Served::start(&config(&repository), &[]);
    let runtime = runtime();
    let config = runtime.block_on(async {
        client(connect(&served.addr).await)
            .model_config(ModelConfigRequest {
                name: "demo".into(),
                version: "2".into(),
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
