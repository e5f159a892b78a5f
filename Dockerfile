# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, ship the binary alone on a
# distroless base (glibc, no shell, no package manager) as a non-root user.
# Build: docker build -t keyward:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keyward \
    && install -D target/release/keyward /out/keyward

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyward /usr/local/bin/keyward
USER 65532:65532
EXPOSE 50051
ENV KEYWARD_DATA_DIR=/var/lib/keyward
ENTRYPOINT ["/usr/local/bin/keyward"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
