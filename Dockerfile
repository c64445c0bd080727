# venus: HTTP gateway -> Kafka.
#
#   docker build -t venus:local .
#   docker run --rm -p 8080:8080 \
#     -e VENUS__KAFKA__BROKERS=<host:port> \
#     -v /path/to/geoip:/geoip:ro -e VENUS__GEOIP__DATABASE=/geoip/GeoLite2-City.mmdb \
#     venus:local
#
# compose/docker-compose.yml runs it with Kafka, GeoIP data, Jaeger,
# Prometheus and Grafana. Settings: /etc/venus/config.yaml (the repo's
# config.yaml), overridden by VENUS__SECTION__KEY environment variables.
#
# Needs BuildKit (default since Docker Engine 23 / Compose v2) for the cache
# mounts below. Build context is filtered by .dockerignore.

############################
# Builder
############################
FROM rust:1.91.1-bookworm AS builder

# rdkafka-sys builds its bundled librdkafka (gcc, make, perl, bash: all in the
# rust:*-bookworm image; no cmake needed). The "ssl" feature links the system
# OpenSSL 3 dynamically (libssl3 is in the distroless runtime image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*

# Link zlib statically (libz-sys honours this): the distroless runtime image
# is not guaranteed to ship libz.so.1. zstd-sys always builds a static copy
# (the zstd-pkg-config feature is not enabled).
ENV LIBZ_SYS_STATIC=1 \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

WORKDIR /src
COPY . .

# target/ lives in a cache mount, so the binary must be copied out in the
# same RUN. The ldd check fails the build if the binary needs a shared
# library that gcr.io/distroless/cc-debian12 does not have.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin venus \
 && install -D -m 0755 target/release/venus /out/venus \
 && echo "shared libraries needed by venus:" && ldd /out/venus \
 && if ldd /out/venus \
        | grep -vE '^[[:space:]]*(linux-vdso\.so|/lib(64)?/ld-linux|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libgcc_s\.so|libstdc\+\+\.so|libssl\.so\.3|libcrypto\.so\.3)' \
        | grep -q . ; then \
      echo "error: venus links a shared library that is not in distroless/cc-debian12" >&2; exit 1; \
    fi

############################
# Runtime
############################
# distroless cc = glibc, libgcc, libstdc++, libssl3, ca-certificates, tzdata;
# no shell, no package manager. The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /out/venus /usr/local/bin/venus
COPY config.yaml /etc/venus/config.yaml

# config.yaml binds 127.0.0.1, which is unreachable from outside a container.
ENV VENUS__SERVER__LISTEN=0.0.0.0:8080

USER 65532:65532
EXPOSE 8080

ENTRYPOINT ["/usr/local/bin/venus", "--config", "/etc/venus/config.yaml"]
