# pgfresh's example shop in a small image: the `shop` binary (pgfresh's CLI plus setup and demo) and
# the plain `pgfresh` binary (install, uninstall, status), running as an unprivileged user.
#
#     docker build -t pgfresh-shop .
#     docker compose up        # PostgreSQL, Redis and the demo, see docker-compose.yml

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --example shop --bin pgfresh

FROM debian:bookworm-slim
# CA certificates: for rediss:// and sslrootcert=system.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home pgfresh
COPY --from=build /src/target/release/examples/shop /usr/local/bin/shop
COPY --from=build /src/target/release/pgfresh /usr/local/bin/pgfresh
USER pgfresh
EXPOSE 8080 9187
ENTRYPOINT ["shop"]
# 0.0.0.0 inside the container, so that a published port reaches it. The status page and /metrics
# have no authentication: publish them to the host's loopback only (-p 127.0.0.1:9187:9187, as
# docker-compose.yml does), or to a private network a scraper reaches.
CMD ["demo", "--web", "0.0.0.0:8080", "--http", "0.0.0.0:9187"]
