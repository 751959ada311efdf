"""A local Code Storage-compatible server: real git http-backend behind JWT checks.

Its command line is `cli/dev_server.py`; nothing here imports click.

- `run`: options, data directory, trusted keys, the server's git environment, signals.
- `server`: HTTP, the anchored routing table (with its security reasoning), streaming
  CGI to `git http-backend`, the JSON request log.
- `auth`: Code Storage's rules on top of `tokens.verify` (repo claim, scopes).
- `hooks`: the pre-receive hook enforcing a token's `refs` policy.
- `api`, `repos`: the REST endpoints and the repositories on disk.
- `tls`: the local CA and certificate for `--tls`.
"""
