# syntax=docker/dockerfile:1
# Multi-stage: a static (musl) build, shipped alone `FROM scratch`: no libc,
# no shell, no package manager, a non-root user. CI builds the final stage
# around its own static build (.ci/image) and checks it; users with registry
# access build all of it:
#   docker build -t keyward:0.1.0 .
FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq musl-tools \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bin keyward \
    && install -D target/x86_64-unknown-linux-musl/release/keyward /out/usr/local/bin/keyward \
    && install -d -m 0700 /out/var/lib/keyward

# --- the image (everything below is what ships) ---
FROM scratch
COPY --from=build --chown=65532:65532 /out/ /
USER 65532:65532
EXPOSE 50051
ENV KEYWARD_DATA_DIR=/var/lib/keyward
ENTRYPOINT ["/usr/local/bin/keyward"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
