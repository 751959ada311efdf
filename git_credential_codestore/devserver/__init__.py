"""A local Code Storage-compatible server: real git http-backend behind JWT checks.

Its command line is `cli/dev_server.py`; nothing here imports click.

- `run`: options, data directory, trusted keys, the server's git environment, signals.
- `server`: HTTP (strict body framing, no Nagle stalls), the anchored git routing table
  (with its security reasoning), streaming CGI to `git http-backend`, the JSON request log.
- `auth`: Code Storage's rules on top of `tokens.verify` (repo claim, scopes).
- `hooks`: the pre-receive hook enforcing a token's `refs` policy.
- `api`: the REST route table (`/api/v1/...` and `/api/repos/{id}/...`, every endpoint
  the official SDK calls, 501 for those not served) with its security reasoning.
- `repos`: the repositories on disk and their `+ephemeral`/`+import` namespaces.
- `tls`: the local CA and certificate for `--tls`.
"""
