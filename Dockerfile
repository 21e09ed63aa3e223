# Claude Runner images (README "Deploying on Spark").
#
#   docker build -t claude-runner .                        the agent (default, last target)
#   docker build --target edge -t claude-runner-edge .     the native edge
#
# Build arguments:
#   CLAUDE_CODE_VERSION  the Claude Code CLI from npm, pinned: change it on purpose, then
#                        run `claude-runner doctor --canary` before trusting the new one
#   BINARIES             `source` (default): compile in the Rust stage below;
#                        `host`: copy binaries you built yourself from HOST_BIN_DIR
#                        (`cargo build --release --locked -p claude-runner -p claude-runner-edge`
#                        on a glibc 2.36 (Debian 12) or older machine); for machines that
#                        cannot reach crates.io from a build, and for the offline podman run
#                        in tests/container/run
#   RUST_IMAGE, NODE_IMAGE, DEBIAN_IMAGE   the official base images (all Debian 12)
#
# With podman, build with `--format docker`: OCI images drop HEALTHCHECK.

ARG RUST_IMAGE=rust:1-bookworm
ARG NODE_IMAGE=node:20-bookworm-slim
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG BINARIES=source

# ---- binaries, compiled here ------------------------------------------------------------
FROM ${RUST_IMAGE} AS binaries-source
# Behind a TLS-inspecting proxy, cargo needs its CA bundle (see NODE_EXTRA_CA_CERTS).
ARG CARGO_HTTP_CAINFO
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit, buildah), so only
# what changed compiles again. Our own sources are touched first: COPY keeps their
# modification times, and cargo must not take a file edited while an earlier build ran
# for one it already compiled.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p claude-runner -p claude-runner-edge \
 && mkdir /out \
 && cp target/release/claude-runner target/release/claude-runner-edge /out/

# ---- binaries, built on the host --------------------------------------------------------
FROM scratch AS binaries-host
ARG HOST_BIN_DIR=target/release
COPY ${HOST_BIN_DIR}/claude-runner ${HOST_BIN_DIR}/claude-runner-edge /out/

# hadolint ignore=DL3006
FROM binaries-${BINARIES} AS binaries

# ---- the native edge ----------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS edge
# Unpinned Debian packages on purpose: bookworm only takes security fixes, and a pin
# would break the build on each of them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --home-dir /var/lib/claude-runner-edge --create-home edge \
 && mkdir /data && chown edge:edge /data
COPY --from=binaries /out/claude-runner-edge /usr/local/bin/claude-runner-edge
ENV LISTEN=0.0.0.0:8787 \
    DATA_DIR=/data \
    LOG_FORMAT=json
USER 10001:10001
VOLUME ["/data"]
# Reached by cloudflared over the compose network; published nowhere by default.
EXPOSE 8787
# Is the port open? (/health itself answers 503 while no agent is connected, which is
# not the edge's fault.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${LISTEN##*:}"]
ENTRYPOINT ["tini", "--"]
CMD ["claude-runner-edge"]

# ---- the agent (default target) -------------------------------------------------------------
FROM ${NODE_IMAGE} AS agent
ARG CLAUDE_CODE_VERSION=2.1.197
# Behind a TLS-inspecting proxy, npm needs its CA: mount the bundle into the build
# (`podman build -v bundle:/run/ca.crt:ro`, or a BuildKit secret) and name it here.
ARG NODE_EXTRA_CA_CERTS
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git tini \
 && rm -rf /var/lib/apt/lists/*
RUN npm install -g --no-audit --no-fund --loglevel=error "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
 && npm cache clean --force
RUN useradd --uid 10001 --user-group --home-dir /home/runner --create-home runner \
 && mkdir -p /home/runner/.claude /data \
 && chown runner:runner /home/runner/.claude /data \
 && chmod 700 /home/runner/.claude /data
COPY --from=binaries /out/claude-runner /usr/local/bin/claude-runner
# The CLI must never replace itself: its version is this image's CLAUDE_CODE_VERSION.
# DATA_DIR is here for `claude-runner status` as root (the HEALTHCHECK), which only reads
# it, taking what a job may have written there as hostile.
ENV DATA_DIR=/data \
    DISABLE_AUTOUPDATER=1 \
    LOG_FORMAT=json
# No USER: the container starts as root, and only the command drops to the runner (the
# ENTRYPOINT). Jobs run as the runner and can read the environment of every dumpable
# process of that user, and the container's environment holds the agent's key and the
# tokens: PID 1 (tini) and what `exec` starts (the HEALTHCHECK, `docker compose exec`)
# hold it too, so they are root's. The agent holds it as the runner, non-dumpable.
# Jobs write the runner's home, so root must not start anything from there: no HOME,
# CLAUDE_CONFIG_DIR or working directory of the runner's for the whole image (a job's
# ~/.bashrc, ~/.gitconfig or ~/.claude/settings.json would run as root in the operator's
# next `docker compose exec agent bash`, `git` or `claude`). `exec` keeps root's /root and
# starts in /; a shell, git or claude for the runner is `exec --user 10001`.
WORKDIR /
VOLUME ["/home/runner/.claude", "/data"]
# No EXPOSE: the agent dials out and listens nowhere. Healthy = running, connected to
# the edge and not stuck, as its status file says (read as root; it writes nothing).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["claude-runner", "status", "--check"]
# tini is PID 1: it forwards `docker stop`'s SIGTERM to the agent (which drains) and
# reaps what Claude's tools leave behind. setpriv runs the command (the agent, or what
# `docker compose run` names: `claude auth login` writes into the login volume as the
# runner) as the runner, with no way back to root's privileges, and env gives that
# command alone the runner's home, folder and login folder (CLAUDE_CONFIG_DIR, a volume,
# so the login outlives the container).
ENTRYPOINT ["tini", "--", "setpriv", "--reuid=10001", "--regid=10001", "--init-groups", "--no-new-privs", "--", \
            "env", "--chdir=/home/runner", "HOME=/home/runner", "CLAUDE_CONFIG_DIR=/home/runner/.claude"]
CMD ["claude-runner", "agent"]
