"""How commands print machine-readable state: one JSON document on stdout.

Field names are a contract (docs/json.md): add fields, never rename or remove one.
"""

from __future__ import annotations

import json

import click


def echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))
