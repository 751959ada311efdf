"""`python -m git_credential_codestore.cli`: how the agent and the demo start `codestore` itself."""

from . import main

raise SystemExit(main())
