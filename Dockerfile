# syntax=docker/dockerfile:1
#
# The Aviary image: one binary that runs every role (`serve`, `gateway`, `worker`,
# `controller`, `ctl`), ONNX Runtime beside it, and the demo models.
#
#   docker build -t aviary .
#   docker run --rm -p 8001:8001 -p 8002:8002 aviary        # the embedded demo
#
# Layout (crates/cli/tests/image.rs builds the same layout without Docker and starts it):
#   /usr/local/bin/aviary
#   /usr/local/lib/libonnxruntime.so.1.31.1   found as ../lib of the binary: no variables
#   /usr/share/aviary/aviary.toml             the default config (the demo)
#   /usr/share/aviary/models/                 the demo models
#   /var/lib/aviary/                          the one writable place (models, state, audit);
#                                             mount a volume there and at /tmp with a
#                                             read-only root filesystem
# Runs as uid/gid 10001; SIGTERM drains (docs/operations.md).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep crates and build output between builds; the binary is copied
# out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aviary-cli --bin aviary \
    && cp target/release/aviary /aviary

# ONNX Runtime from the official onnxruntime wheel on PyPI, by the script the checkout's
# setup uses: the same library in the image as in the tests.
FROM docker.io/library/python:3.11-slim-bookworm AS onnxruntime
COPY scripts/fetch-onnxruntime.sh /fetch-onnxruntime.sh
RUN /fetch-onnxruntime.sh /onnxruntime

FROM docker.io/library/debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="aviary" \
      org.opencontainers.image.description="A gRPC inference gateway for ONNX models: KServe v2, weighted canaries, shadow traffic, automated rollouts" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/aviary-dev/aviary"
# ca-certificates: TLS to workers, OTLP collectors, Redis and S3 with public CAs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 aviary \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/aviary \
       --no-create-home --shell /usr/sbin/nologin aviary \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/aviary
COPY --from=build /aviary /usr/local/bin/aviary
COPY --from=onnxruntime /onnxruntime/libonnxruntime.so.1.31.1 /usr/local/lib/libonnxruntime.so.1.31.1
COPY --from=onnxruntime /onnxruntime/LICENSE /usr/share/doc/onnxruntime/LICENSE
COPY --from=onnxruntime /onnxruntime/ThirdPartyNotices.txt /usr/share/doc/onnxruntime/ThirdPartyNotices.txt
COPY deploy/image/aviary.toml /usr/share/aviary/aviary.toml
COPY deploy/local/models /usr/share/aviary/models
USER 10001:10001
WORKDIR /var/lib/aviary
# gRPC inference, /metrics, admin API (gateway defaults in deploy/image/aviary.toml).
EXPOSE 8000 8001 8002 8003
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/aviary"]
CMD ["serve", "--config", "/usr/share/aviary/aviary.toml"]
