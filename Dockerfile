# pullgate's image, built the way pullgate advises images be built: a
# multi-stage build whose runtime stage is distroless (no shell, no package
# manager), holding only the binary and its default config, run as a
# non-root user.
#
#   docker build -t pullgate:dev .
#
# See README.md ("Container image") for signing it with cosign and pinning it
# by digest. Pin the two base images by digest too, for a reproducible build:
#   FROM docker.io/library/rust:1.95-trixie@sha256:... AS build

ARG RUST_VERSION=1.95

# The build stage runs Debian 13 (trixie), like the runtime stage, so the
# binary links against the glibc it will run with.
FROM docker.io/library/rust:${RUST_VERSION}-trixie AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY benches/micro.rs benches/micro.rs
COPY src src
COPY config/default.toml config/default.toml
RUN cargo build --release --locked \
 && install -d -m 0700 /out/var/lib/pullgate

# The Debian 12 distroless images reached end of life in September 2026.
FROM gcr.io/distroless/cc-debian13:nonroot
COPY --from=build /src/target/release/pullgate /usr/local/bin/pullgate
COPY config/container.toml /etc/pullgate/pullgate.toml
# The store: the one directory the user below can write (mount a volume).
COPY --from=build --chown=65532:65532 /out/var/lib/pullgate /var/lib/pullgate
USER 65532:65532
ENV PULLGATE_CONFIG=/etc/pullgate/pullgate.toml
# 5000: the registry API; 9090: /metrics /healthz /readyz.
EXPOSE 5000 9090
ENTRYPOINT ["/usr/local/bin/pullgate"]
CMD ["serve"]
