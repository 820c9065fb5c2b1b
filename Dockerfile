# syntax=docker/dockerfile:1
# Build: docker build -t dify-gateway .
# Run:   docker run -p 8080:8080 -e DIFY_API_KEY=app-... dify-gateway
#        (or mount a key file and set upstream.api_key_file in a mounted config)

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches examples && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo fetch --locked
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY config ./config
RUN cargo build --release --locked --bin dify-gateway \
    && strip target/release/dify-gateway

# distroless/cc: glibc and CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/dify-gateway /usr/local/bin/dify-gateway
COPY --from=build /src/config/dify-gateway.toml /etc/dify-gateway/dify-gateway.toml
USER nonroot:nonroot
ENV DIFY_GATEWAY_CONFIG=/etc/dify-gateway/dify-gateway.toml \
    DIFY_GATEWAY_LISTEN=0.0.0.0:8080 \
    DIFY_GATEWAY_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/dify-gateway", "--health-probe", "127.0.0.1:8080"]
ENTRYPOINT ["/usr/local/bin/dify-gateway"]
