# An E2B template with codestore: built as root, run as E2B's user `user`.
# Build from the codestore checkout:  e2b template build -c "/root/.jupyter/start-up.sh" \
#   --dockerfile examples/e2b/e2b.Dockerfile --name codestore-sandbox   (or your own base)
FROM e2bdev/base
RUN apt-get update \
 && apt-get install -y --no-install-recommends git python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY . /opt/codestore-src
# As root: system-wide into /opt/codestore and /usr/local/bin, git's system config set.
RUN /opt/codestore-src/install.sh --setup --org acme
COPY examples/sandbox/work.sh /usr/local/bin/codestore-work
