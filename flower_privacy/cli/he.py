"""``flower-privacy he``: recover a model saved by encrypted FedAvg."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flower_privacy.cli._common import user_errors

he_app = typer.Typer(help="Encrypted FedAvg: recover a model with the clients' key.")


@he_app.command("decrypt")
def he_decrypt(
    model: Annotated[Path, typer.Argument(help="Encrypted model saved by EncryptedFedAvg.")],
    context: Annotated[Path, typer.Option(help="client.ctx (the secret context).")],
    out: Annotated[Path, typer.Option(help="Output .npz of the model's arrays (mode 0600).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
) -> None:
    """Decrypt a saved encrypted model (every canary and bound is checked first)."""
    import io
    import os

    import numpy as np

    from flower_privacy import he
    from flower_privacy.he.keys import write_private_file

    with user_errors(he.HEConfigError, he.KeyRoleError, he.InvalidCiphertext, OSError):
        if not force and (out.exists() or out.is_symlink()):
            raise FileExistsError(f"{out} exists already (pass --force to overwrite it)")
        ctx = he.HEContext.load(context)
        decrypted = he.decrypt_model(ctx, model.read_bytes())
        buffer = io.BytesIO()
        np.savez(buffer, **decrypted.arrays)
        if force:
            write_private_file(out, buffer.getvalue())  # atomic replace, 0600 from the start
        else:  # O_EXCL: never follows or replaces a file that appeared meanwhile
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
    typer.echo(
        f"wrote {out}: {len(decrypted.arrays)} arrays, the weighted mean of "
        f"{decrypted.contributors} contributions (total weight {decrypted.total_weight})"
    )
