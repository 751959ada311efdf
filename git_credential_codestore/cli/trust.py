"""`codestore trust add|list|remove`: which workload identities (OIDC) may exchange their token for ours.

Admin calls to the running agent over its own socket, like `codestore grant`; the agent
validates a policy with the grant's own rules, so a policy can give no more than a grant.
"""

from __future__ import annotations

import json

import click

from ..errors import ConfigError
from .agent import SOCKET_HELP, admin, admin_change, warn
from .grant import _when, _words, parse_duration


@click.group("trust")
def trust() -> None:
    """Trust policies: workload identities (GitHub Actions, Modal, Kubernetes) instead of grants."""


def _claims(values: tuple[str, ...]) -> list[list[str]]:
    out = []
    for v in values:
        name, sep, pattern = v.partition("=")
        if not sep or not name.strip() or not pattern:
            raise ConfigError(f"--claim wants NAME=PATTERN (e.g. repository=acme/app), not {v!r}")
        out.append([name.strip(), pattern])
    return out


@trust.command("add")
@click.option("--issuer", required=True, help="The issuer URL, exactly as its tokens' iss (e.g. https://token.actions.githubusercontent.com).")
@click.option("--audience", required=True, help="The aud the workload's tokens must carry (for GitHub Actions: the agent URL the job uses).")
@click.option("--claim", "claims", multiple=True, metavar="NAME=PATTERN", help="A claim condition, glob pattern (repeatable; all must match; at least one).")
@click.option("--repo", "repos", multiple=True, required=True, help="Repository id or glob (repeatable), e.g. team/app or team/*.")
@click.option("--scopes", "scopes", multiple=True, help='Scopes (default git:read), e.g. --scopes "git:read git:write".')
@click.option("--max-ttl", type=int, default=900, show_default=True, help="Longest Code Storage token lifetime in seconds (<= 3600).")
@click.option("--ephemeral-only", is_flag=True, help="Only the +ephemeral namespace (checked at mint time, as for grants).")
@click.option("--ref-policy", metavar="RULES", help="refs rules put in every token, e.g. 'refs/heads/main=no-push'.")
@click.option("--sub-template", metavar="TEMPLATE",
              help="The minted token's sub from the workload's claims (default oidc:{sub}), e.g. 'github:{repository}@{ref}'.")
@click.option("--max-identity-lifetime", metavar="DURATION", help="Refuse identity tokens that live longer than this (default 1h; Modal's live 48h).")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the policy as one JSON object.")
def trust_add(issuer: str, audience: str, claims: tuple[str, ...], repos: tuple[str, ...], scopes: tuple[str, ...],
              max_ttl: int, ephemeral_only: bool, ref_policy: str | None, sub_template: str | None,
              max_identity_lifetime: str | None, socket_opt: str | None, as_json: bool) -> None:
    """Trust workloads whose identity tokens match; they get what a grant with these terms would."""
    from ..vocab import parse_scopes

    body: dict[str, object] = {
        "issuer": issuer, "audience": audience, "claims": _claims(claims), "repos": list(repos),
        "scopes": list(parse_scopes(" ".join(scopes) or "git:read", "--scopes")), "max_ttl": max_ttl,
        "ephemeral_only": ephemeral_only, "sub_template": sub_template,
        "max_identity_lifetime": parse_duration(max_identity_lifetime) if max_identity_lifetime else None,
    }
    if ref_policy:
        from ..vocab import parse_ref_policy, ref_policy_json

        body["refs"] = ref_policy_json(parse_ref_policy(ref_policy))
    p = admin(socket_opt, "POST", "/v1/trust", body)
    warn(p)
    if as_json:
        click.echo(json.dumps(p, indent=2))
        return
    click.echo(f"id:      {p['id']}")
    _describe(p)


def _describe(p: dict[str, object]) -> None:
    pairs = p["claims"]
    assert isinstance(pairs, list)  # the agent's JSON: [[name, value], ...]
    claims = " ".join(f"{n}={v}" for n, v in pairs)
    click.echo(f"trusts:  {p['issuer']}  aud {p['audience']}  {claims}")
    click.echo(
        f"grants:  {_words(p['repos'])}  scopes {_words(p['scopes'])}  max ttl {p['max_ttl']}s"
        f"{'  ephemeral only' if p['ephemeral_only'] else ''}  sub {p['sub_template']}"
    )


@trust.command("list")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
@click.option("--json", "as_json", is_flag=True)
def trust_list(socket_opt: str | None, as_json: bool) -> None:
    """The trust policies, oldest first (the first that admits a workload decides)."""
    policies = admin(socket_opt, "GET", "/v1/trust")["policies"]
    assert isinstance(policies, list)
    if as_json:
        click.echo(json.dumps(policies, indent=2))
        return
    if not policies:
        click.echo("no trust policies; add one with: codestore trust add --issuer URL --audience AUD --claim NAME=PATTERN --repo REPO")
        return
    for p in policies:
        click.echo(f"{p['id']}  added {_when(p['created_at'])}")
        _describe(p)


@trust.command("remove")
@click.argument("policy_id")
@click.option("--socket", "socket_opt", metavar="PATH", help=SOCKET_HELP)
def trust_remove(policy_id: str, socket_opt: str | None) -> None:
    """Remove a policy: no new exchange under it from now on (minted tokens end at their short expiry)."""
    p = admin_change(socket_opt, "trust policy", "trust", policy_id, "/v1/trust/{}/remove")
    click.echo(f"removed {p['id']} ({p['issuer']}); it admits nothing from now on")
