# Image of the stream-credits worker. Build with `docker build -t stream-credits .`
# or through docker-compose.yml. Needs BuildKit (the default builder since
# Docker 23) for the cache mounts.

# Build stage: the release binary from the locked dependency versions.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between
# builds. They are not part of the image, so the binary is copied out in
# the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/stream-credits /usr/local/bin/stream-credits

# Runtime stage: the binary and the demo's recorded input, run as an
# unprivileged user. curl serves the health check in docker-compose.yml.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install --yes --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system stream-credits \
    && useradd --system --gid stream-credits --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin stream-credits
COPY --from=build /usr/local/bin/stream-credits /usr/local/bin/stream-credits
# `stream-credits demo` reads `data/` relative to the working directory.
WORKDIR /app
COPY data/ /app/data/
USER stream-credits
# Port of the HTTP endpoint (/metrics, /healthz, /readyz) when
# STREAM_CREDITS__HTTP__LISTEN is 0.0.0.0:9464, as in docker-compose.yml.
EXPOSE 9464
ENTRYPOINT ["stream-credits"]
CMD ["run"]
