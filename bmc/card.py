"""Model cards: the JSON that makes a ``.tflite`` file self-describing.

A card sits beside its model (``name_int8.tflite`` → ``name_int8.json``) and carries the
contract (labels, input size, colour order, crop, normalisation, cell scale, schema version), the
sha256 of the ``.tflite`` it describes, the hash of the float model it came from and the
validation gate's results. The edge app and ``bmc evaluate`` refuse a model whose card is missing,
unreadable, or describes another file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bmc.contract import Contract, ContractError
from bmc.errors import BmcError

CARD_SCHEMA = 1

#: a model card's JSON, as written (:func:`write_card`) and before it is checked
Card = dict[str, Any]


def _section(d: Card, key: str) -> dict[str, Any] | None:
    v = d.get(key)
    return dict(v) if isinstance(v, dict) else None


@dataclasses.dataclass(frozen=True, eq=False)
class ModelCard(Mapping[str, Any]):
    """A model card as :func:`load_card` checked it, beside :class:`Contract` (timm's
    ``PretrainedCfg`` is the model): the fields the kit acts on, typed, and the JSON it was read
    from in ``raw``. It reads as that JSON too (``card["validation"]``), for code that copies
    sections into a derived card (an adapted model's)."""

    file: str
    sha256: str
    contract: Contract
    name: str  # the model's name, its file's stem where the card has none
    variant: str
    deployable: bool
    outputs: tuple[str, ...]  # what the model's outputs are, in order (probabilities, embedding)
    guard: dict[str, Any] | None  # the guard set beside it (file, sha256, cells)
    unknown: dict[str, Any] | None  # the unknown-cell calibration
    head: dict[str, Any] | None  # an adapted model's numpy head (file, sha256, labels)
    base_model: dict[str, Any] | None  # an adapted model's base (file, sha256)
    validation: dict[str, Any]
    adaptation: dict[str, Any]
    raw: Card = dataclasses.field(repr=False)
    # what the model's differential is of: ``blood`` (per 100 leukocytes) or ``marrow`` (per 100
    # nucleated cells); the shipped models learnt from peripheral-blood cells
    specimen: str = "blood"

    @classmethod
    def from_dict(cls, d: Card, contract: Contract, stem: str = "") -> ModelCard:
        return cls(
            file=str(d.get("file", "")),
            sha256=str(d["sha256"]),
            contract=contract,
            name=str(d.get("name") or stem),
            variant=str(d.get("variant") or ""),
            deployable=bool(d.get("deployable", False)),
            outputs=tuple(str(o) for o in d.get("outputs") or ()),
            guard=_section(d, "guard"),
            unknown=_section(d, "unknown"),
            head=_section(d, "head"),
            base_model=_section(d, "base_model"),
            validation=_section(d, "validation") or {},
            adaptation=_section(d, "adaptation") or {},
            raw=d,
            specimen=_specimen(d),
        )

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class ModelCardError(BmcError, ValueError):
    """A model file that cannot be used safely; the message names the file and what is wrong."""


def _specimen(d: Card) -> str:
    specimen = str(d.get("specimen") or "blood")
    if specimen not in ("blood", "marrow"):
        raise ModelCardError(f"the card's specimen must be 'blood' or 'marrow', got {specimen!r}")
    return specimen


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


def read_card(model_path: str | Path) -> Card:
    """The card of ``model_path`` as written, unverified: for the tools that add to a card they made
    (conversion, the embedding, the ONNX export) and for listing cards. A device reads a card
    through :func:`load_card`, which verifies it against its model."""
    cp = card_path(model_path)
    try:
        card = json.loads(cp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelCardError(f"{cp}: model card is not valid JSON ({e})") from e
    except FileNotFoundError as e:
        raise ModelCardError(f"{model_path}: no model card ({cp.name} expected beside it)") from e
    if not isinstance(card, dict):
        raise ModelCardError(f"{cp}: model card is not a JSON object")
    return card


def update_card(model_path: str | Path, **fields: Any) -> Card:
    """Set ``fields`` in the card of ``model_path`` (atomically: a crash leaves the old card)."""
    card = {**read_card(model_path), **fields}
    cp = card_path(model_path)
    tmp = cp.with_name(f".{cp.name}.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(cp)
    return card


def load_card(model_path: str | Path, require_deployable: bool = False) -> tuple[ModelCard, Contract]:
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
    card = read_card(model_path)
    if "contract" not in card or "sha256" not in card:
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
    return ModelCard.from_dict(card, contract, model_path.stem), contract
