"""Model cards: the JSON that makes a ``.tflite`` file self-describing.

A card sits beside its model (``name_int8.tflite`` → ``name_int8.json``) and carries the
contract (labels, input size, colour order, crop, normalisation, cell scale, schema version), the
sha256 of the ``.tflite`` it describes, the hash of the float model it came from and the
validation gate's results. The edge app and ``bmc evaluate`` refuse a model whose card is missing,
unreadable, or describes another file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bmc.contract import Contract, ContractError
from bmc.errors import BmcError

CARD_SCHEMA = 1

#: a model card as read from its JSON (its contract is checked into a :class:`Contract` on load)
Card = dict[str, Any]


class ModelCardError(BmcError, ValueError):
    """A model file that cannot be used safely; the message names the file and what is wrong."""


def card_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_beside(model_path: str | Path, spec: dict[str, Any], what: str, error: type[Exception] | None = None) -> Path:
    """The file a model card names beside its model (``spec['file']``, e.g. its head or guard set),
    checked to exist and to match ``spec['sha256']``; else ``error`` (ModelCardError) says which."""
    error = error or ModelCardError
    path = Path(model_path).parent / str(spec["file"])
    if not path.is_file():
        raise error(f"{model_path}: its {what} {path.name} is missing beside it")
    if sha256_file(path) != spec.get("sha256"):
        raise error(f"{path}: does not match the sha256 in {Path(model_path).name}'s card: replaced or corrupted")
    return path


def write_card(model_path: str | Path, card: Card) -> Path:
    model_path = Path(model_path)
    card = {
        "card_schema": CARD_SCHEMA,
        "file": model_path.name,
        "sha256": sha256_file(model_path),
        "size_bytes": model_path.stat().st_size,
        **card,
    }
    out = card_path(model_path)
    out.write_text(json.dumps(card, indent=2) + "\n")
    return out


def load_card(model_path: str | Path, require_deployable: bool = False) -> tuple[Card, Contract]:
    """Read and verify the card of ``model_path``; returns ``(card, contract)``."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelCardError(f"{model_path}: model file not found")
    cp = card_path(model_path)
    if not cp.is_file():
        raise ModelCardError(
            f"{model_path}: no model card ({cp.name} expected beside it); "
            "convert the model with 'bmc convert', which writes one"
        )
    try:
        card = json.loads(cp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelCardError(f"{cp}: model card is not valid JSON ({e})") from e
    if not isinstance(card, dict) or "contract" not in card or "sha256" not in card:
        raise ModelCardError(f"{cp}: model card lacks 'contract' or 'sha256'")
    if card.get("card_schema") != CARD_SCHEMA:
        raise ModelCardError(
            f"{cp}: card schema {card.get('card_schema')!r} is not supported (this bmc reads {CARD_SCHEMA})"
        )
    actual = sha256_file(model_path)
    if actual != card["sha256"]:
        raise ModelCardError(
            f"{model_path}: file does not match its model card {cp.name} (sha256 "
            f"{actual[:12]}… vs card {str(card['sha256'])[:12]}…): replaced or corrupted"
        )
    try:
        contract = Contract.from_dict(card["contract"])
    except ContractError as e:
        raise ModelCardError(f"{cp}: {e}") from e
    if require_deployable and not card.get("deployable", False):
        raise ModelCardError(
            f"{model_path}: not marked deployable (it failed or skipped the "
            "validation gate); see its card's 'validation'"
        )
    return card, contract
