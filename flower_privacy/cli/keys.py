"""``flower-privacy keys``: signing keys for secure aggregation, TenSEAL keys for HE."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flower_privacy.cli._common import user_errors

keys_app = typer.Typer(help="Keys for the privacy mechanisms.")


@keys_app.command("signing")
def keys_signing(
    nodes: Annotated[int, typer.Option(help="How many nodes get a signing key.")],
    out: Annotated[Path, typer.Option(help="Folder for node-<i>.key files and roster.txt.")],
) -> None:
    """Signing keys and a roster for secure aggregation's consistency check."""
    from flower_privacy.secagg.signing import write_signing_keys

    paths, roster = write_signing_keys(out, nodes)
    typer.echo(f"wrote {len(paths)} signing keys and {roster}")
    typer.echo(
        'give node i: --node-config "secagg-signing-key=<out>/node-i.key '
        'secagg-roster=<out>/roster.txt ..."; keep each key on its own node'
    )


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="Folder for client.ctx (secret) and server.ctx.")],
    preset: Annotated[str, typer.Option(help="bfv (default), ckks or nvflare.")] = "bfv",
    max_clients: Annotated[int, typer.Option(help="Most clients per round.")] = 100,
    max_weight: Annotated[int, typer.Option(help="Cap of a client's example count.")] = 1000,
    clip_range: Annotated[float, typer.Option(help="Model values clipped to ±this.")] = 4.0,
    precision_bits: Annotated[int, typer.Option(help="BFV step 2^-bits.")] = 16,
    force: Annotated[bool, typer.Option(help="Overwrite existing key files.")] = False,
) -> None:
    """A TenSEAL key pair for encrypted FedAvg, sized so that sums cannot wrap."""
    from flower_privacy import he

    with user_errors(he.HEConfigError):
        limits = he.DeclaredLimits(max_clients, max_weight, clip_range, precision_bits)
        params = he.derive_parameters(preset, limits)
        client, server = he.generate_keys(out, params, overwrite=force)
    if params.scheme == "bfv":
        detail = f"plain modulus {params.plain_modulus}"
    else:
        detail = f"scale 2^{params.scale_bits}"
    typer.echo(
        f"{preset}: {params.scheme.upper()} N={params.poly_modulus_degree}, coefficient "
        f"modulus {list(params.coeff_mod_bit_sizes)} bits, {detail}; precision "
        f"{he.precision_bound(params, limits):.3g}"
    )
    typer.echo(f"wrote {client} (secret key, mode 0600: clients only) and {server} (public)")
    typer.echo(
        f"server: EncryptedFedAvg(..., server_context='{server}', max_clients={max_clients}, "
        f"max_weight={max_weight}, clip_range={clip_range}, precision_bits={precision_bits}); "
        f"each node: --node-config \"he-context='{client}'\""
    )
