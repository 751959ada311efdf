"""git-remote-codestore: `codestore://org/repo` remotes with per-operation least privilege."""
