//! Message compression on the inference port: requests compressed with gzip or deflate
//! are served by `aviary serve` and `aviary worker`, and responses are compressed only
//! when `[server] response_compression` asks and the client accepts it.

mod support;

use support::*;
use tonic::codec::CompressionEncoding;

const GOOD: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

/// The `grpc-encoding` of a demo answer from `addr`, the request sent with `send` and
/// the client accepting `accept`.
fn answer_encoding(
    addr: &str,
    send: CompressionEncoding,
    accept: CompressionEncoding,
) -> Option<String> {
    runtime().block_on(async {
        let response = client(connect(addr).await)
            .send_compressed(send)
            .accept_compressed(accept)
            .model_infer(demo_rows("1", &[GOOD]))
            .await
            .expect("a compressed request is served");
        assert_eq!(response.get_ref().model_version, "1");
        response
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

#[test]
fn compressed_requests_are_served_and_responses_compressed_when_configured() {
    let models = repo_root().join("tests/models");
    let repository = format!(
        "[repository]\npath = \"{}\"\ninstances = 1\n",
        models.display()
    );
    let plain = Served::start(&repository, &[]);
    let compressing = Served::start(
        &format!("[server]\nresponse_compression = [\"deflate\", \"gzip\"]\n\n{repository}"),
        &[],
    );
    let (_worker, worker) = start_worker_args(&models, 1, &[]);
    for (send, accept) in [
        (CompressionEncoding::Gzip, CompressionEncoding::Gzip),
        (CompressionEncoding::Deflate, CompressionEncoding::Deflate),
    ] {
        assert_eq!(
            answer_encoding(&plain.addr, send, accept),
            None,
            "off by default"
        );
        assert_eq!(answer_encoding(&worker, send, accept), None);
        let name = match accept {
            CompressionEncoding::Gzip => "gzip",
            _ => "deflate",
        };
        assert_eq!(
            answer_encoding(&compressing.addr, send, accept).as_deref(),
            Some(name),
            "the one the client accepts"
        );
    }
}
