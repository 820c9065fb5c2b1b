# syntax=docker/dockerfile:1
# Build: docker build -t dify-gateway .
# Run:   docker run -p 8080:8080 -e DIFY_API_KEY=app-... dify-gateway
#        (or mount a key file and set upstream.api_key_file in a mounted config)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY config ./config
# Cache mounts keep the registry and build artefacts between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dify-gateway \
    && strip target/release/dify-gateway \
    && cp target/release/dify-gateway /dify-gateway

# distroless/cc: glibc and CA certificates, no shell, runs as uid 65532.
# The health check asks the admin listener (plain HTTP on loopback, default 127.0.0.1:9090), so
# it keeps working when the public listener serves TLS.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /dify-gateway /usr/local/bin/dify-gateway
COPY --from=build /src/config/dify-gateway.toml /etc/dify-gateway/dify-gateway.toml
USER nonroot:nonroot
ENV DIFY_GATEWAY_CONFIG=/etc/dify-gateway/dify-gateway.toml \
    DIFY_GATEWAY_LISTEN=0.0.0.0:8080 \
    DIFY_GATEWAY_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/dify-gateway", "--health-probe", "127.0.0.1:9090"]
ENTRYPOINT ["/usr/local/bin/dify-gateway"]
