"""What each server version advertised and did: ONE table, read by the reference server.

Sources: timeline.yaml (features by first version), qemu-nbd-interop.txt (qemu's docs/interop/nbd.txt,
"Features by version"), and what Debian's packages of qemu-nbd, nbdkit and nbd-server advertised when
probed (memory or raw-file export, no TLS; e.g. qemu-nbd 5.2/7.2: block size 1/4096/32M and flush, fua,
trim, zero, fast_zero, df, cache; nbd-server 3.24: no structured replies, WRITE_ZEROES and MULTI_CONN
only).  A field whose value for that version is *not* documented in those sources is still given a value
(the server must do something) but is listed in ``unknown``, with the reason in ``notes``: a test should
not treat such a field as evidence about the real peer.

Meta-context names are the core's (``_constants.CONTEXT_*``); ``BASE_ALLOCATION``, ``DIRTY_BITMAP`` and
``ALLOCATION_DEPTH`` are the same objects under the names this table has always used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ._constants import CONTEXT_BASE_ALLOCATION as BASE_ALLOCATION
from ._constants import CONTEXT_QEMU_ALLOCATION_DEPTH as ALLOCATION_DEPTH
from ._constants import CONTEXT_QEMU_DIRTY_BITMAP_PREFIX as DIRTY_BITMAP
from ._constants import DEFAULT_MAX_PAYLOAD, DEFAULT_MIN_BLOCK, DEFAULT_PREF_BLOCK

__all__ = [
    "ALLOCATION_DEPTH",
    "BASE_ALLOCATION",
    "DEFAULT",
    "DIRTY_BITMAP",
    "PERSONAS",
    "Persona",
    "format_table",
    "get",
    "with_changes",
]

DEFAULT = "nbdref"
"""Name of the reference persona (the whole spec, emulating no release): the default of ``get``, of
``Server(persona=...)`` and of ``python -m nbdref serve --persona``."""

# The maximum payload qemu-nbd advertises (its NBD_MAX_BUFFER_SIZE, 32 MiB): the same number as the
# spec's default maximum payload (DEFAULT_MAX_PAYLOAD, 2^25), but a fact about qemu, not about the spec.
_QEMU_MAX_PAYLOAD = 32 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Persona:
    """How the reference server behaves when it plays ``implementation`` at ``version``."""

    name: str
    implementation: str
    version: str
    # Handshake
    fixed_newstyle: bool = True            # NBD_FLAG_FIXED_NEWSTYLE
    no_zeroes: bool = True                 # NBD_FLAG_NO_ZEROES
    opt_go: bool = True                    # NBD_OPT_GO and NBD_OPT_INFO (else NBD_REP_ERR_UNSUP)
    info_name: bool = True                 # answers NBD_INFO_NAME requests
    info_description: bool = True          # answers NBD_INFO_DESCRIPTION requests
    # Sent with INFO/GO when requested (None: never sent); enforced once NBD_OPT_GO advertised it.
    info_block_size: tuple[int, int, int] | None = (DEFAULT_MIN_BLOCK, DEFAULT_PREF_BLOCK, DEFAULT_MAX_PAYLOAD)
    info_size_zero: bool = False           # nbd-server quirk: NBD_OPT_INFO reports export size 0
    structured_replies: bool = True        # accepts NBD_OPT_STRUCTURED_REPLY
    offset_hole: bool = True               # sends NBD_REPLY_TYPE_OFFSET_HOLE for sparse reads
    error_messages: bool = True            # error chunks carry a message
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION, DIRTY_BITMAP, ALLOCATION_DEPTH)
    block_status_single_extent: bool = False  # one extent per reply, whatever was asked
    extended_headers: bool = True          # NBD_OPT_EXTENDED_HEADERS (experimental extension)
    block_status_payload: bool = True      # NBD_FLAG_BLOCK_STATUS_PAYLOAD (needs extended headers)
    # Transmission flags offered (each also gates the command / flag on the server side)
    flush: bool = True
    fua: bool = True
    trim: bool = True
    write_zeroes: bool = True
    fast_zero: bool = True
    df: bool = True
    cache: bool = True
    multi_conn_ro: bool = True             # NBD_FLAG_CAN_MULTI_CONN on read-only exports
    multi_conn_rw: bool = True             # ... and on writable ones
    # TLS
    tls_x509: bool = True
    tls_psk: bool = True
    # Other behaviour
    abort_ack: bool = True                 # replies NBD_REP_ACK to NBD_OPT_ABORT (nbd-server does not)
    handshake_timeout: float | None = None  # seconds a client may take to finish negotiation
    unknown: tuple[str, ...] = ()          # fields above not documented for this version
    notes: str = ""
    sources: str = ""

    def supports_context(self, name: str) -> bool:
        """Whether a full context name (e.g. ``qemu:dirty-bitmap:b0``) belongs to a family we offer."""
        if name in (BASE_ALLOCATION, ALLOCATION_DEPTH):
            return name in self.meta_contexts
        return name.startswith(DIRTY_BITMAP) and DIRTY_BITMAP in self.meta_contexts

    def offers(self, feature: str) -> bool | None:
        """Does this persona offer a timeline feature (fixtures/data/timeline.yaml's keys), in its
        default newstyle handshake?  None for a key this table has no field for.  The reference persona
        is judged by this (it emulates no release, so the timeline cannot judge it)."""
        rule = _FEATURE_FIELDS.get(feature)
        if rule is None:
            return None
        return bool(rule(self))

    def as_row(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Timeline feature -> what in a persona offers it (the handshake style is the server's option, not the
# persona's: by default every persona runs newstyle, never oldstyle).
_FEATURE_FIELDS: dict[str, object] = {
    "oldstyle": lambda p: False,
    "newstyle": lambda p: True,
    "fixed-newstyle": lambda p: p.fixed_newstyle,
    "NBD_FLAG_NO_ZEROES": lambda p: p.no_zeroes,
    "NBD_OPT_EXPORT_NAME": lambda p: True,
    "NBD_OPT_ABORT": lambda p: p.fixed_newstyle,
    "NBD_OPT_LIST": lambda p: p.fixed_newstyle,
    "NBD_OPT_STARTTLS": lambda p: p.tls_x509 or p.tls_psk,
    "TLS-PSK": lambda p: p.tls_psk,
    "NBD_OPT_INFO": lambda p: p.opt_go,
    "NBD_OPT_GO": lambda p: p.opt_go,
    "NBD_INFO_EXPORT": lambda p: p.opt_go,
    "NBD_INFO_NAME": lambda p: p.opt_go and p.info_name,
    "NBD_INFO_DESCRIPTION": lambda p: p.opt_go and p.info_description,
    "NBD_INFO_BLOCK_SIZE": lambda p: p.opt_go and p.info_block_size is not None,
    "NBD_OPT_STRUCTURED_REPLY": lambda p: p.structured_replies,
    "NBD_OPT_LIST_META_CONTEXT": lambda p: bool(p.meta_contexts),
    "NBD_OPT_SET_META_CONTEXT": lambda p: bool(p.meta_contexts),
    "NBD_CMD_BLOCK_STATUS": lambda p: BASE_ALLOCATION in p.meta_contexts,
    "NBD_CMD_FLAG_REQ_ONE": lambda p: BASE_ALLOCATION in p.meta_contexts,
    # the timeline names these two features after their contexts
    DIRTY_BITMAP.rstrip(":"): lambda p: DIRTY_BITMAP in p.meta_contexts,
    ALLOCATION_DEPTH: lambda p: ALLOCATION_DEPTH in p.meta_contexts,
    "NBD_CMD_WRITE_ZEROES": lambda p: p.write_zeroes,
    "NBD_CMD_FLAG_NO_HOLE": lambda p: p.write_zeroes,
    "NBD_CMD_TRIM": lambda p: p.trim,
    "NBD_CMD_FLUSH": lambda p: p.flush,
    "NBD_CMD_FLAG_FUA": lambda p: p.fua,
    "NBD_CMD_CACHE": lambda p: p.cache,
    "NBD_CMD_FLAG_FAST_ZERO": lambda p: p.fast_zero,
    "NBD_FLAG_CAN_MULTI_CONN-readonly": lambda p: p.multi_conn_ro,
    "NBD_FLAG_CAN_MULTI_CONN-writable": lambda p: p.multi_conn_rw,
    "NBD_CMD_FLAG_DF": lambda p: p.df,
    "NBD_OPT_EXTENDED_HEADERS": lambda p: p.extended_headers,
    "NBD_FLAG_BLOCK_STATUS_PAYLOAD": lambda p: p.extended_headers and p.block_status_payload,
}

_NBDREF = Persona(
    name=DEFAULT,
    implementation="nbdref",
    version="0.1",
    notes="the reference server: every feature of proto.md and the extended-headers draft",
    sources="proto.md; proto-extension-ext-header.md",
)

_QEMU_ALWAYS_UNKNOWN = ("flush", "fua", "trim", "info_name", "info_description", "abort_ack")
_QEMU_NOTE = (
    "qemu-nbd-interop.txt lists features from 2.6 on; FLUSH/FUA/TRIM, NBD_INFO_NAME/DESCRIPTION and the "
    "NBD_OPT_ABORT reply are not listed for any version, so their values here are assumptions."
)


def _qemu(version: str, *, unknown: tuple[str, ...] = (), notes: str = "", **kw: object) -> Persona:
    return Persona(
        name=f"qemu-{version}",
        implementation="qemu-nbd",
        version=version,
        unknown=tuple(dict.fromkeys(_QEMU_ALWAYS_UNKNOWN + unknown)),
        notes=(_QEMU_NOTE + " " + notes).strip(),
        sources="qemu-nbd-interop.txt; timeline.yaml",
        **kw,  # type: ignore[arg-type]
    )


# qemu 2.6: "NBD_OPT_STARTTLS with TLS X.509 Certificates"; no GO/INFO (answers ERR_UNSUP, clients fall
# back to EXPORT_NAME), no structured replies, no WRITE_ZEROES, nothing later in the list.
_Q26 = dict(
    opt_go=False, info_block_size=None, structured_replies=False, offset_hole=False, meta_contexts=(),
    extended_headers=False, block_status_payload=False, write_zeroes=False, fast_zero=False, df=False,
    cache=False, multi_conn_ro=False, multi_conn_rw=False, tls_psk=False, info_name=False,
    info_description=False,
)
_Q28 = {**_Q26, "write_zeroes": True}
# 2.10: "NBD_OPT_GO, NBD_INFO_BLOCK"; qemu-nbd advertised a minimum block size of 512 for raw images
# until 4.0 (1 since then).
_Q210 = {**_Q28, "opt_go": True, "info_block_size": (512, 4096, _QEMU_MAX_PAYLOAD), "info_name": True,
         "info_description": True}
_Q211 = {**_Q210, "structured_replies": True, "offset_hole": True, "df": True}
_Q212 = {**_Q211, "meta_contexts": (BASE_ALLOCATION,), "block_status_single_extent": True}
_Q30 = {**_Q212, "meta_contexts": (BASE_ALLOCATION, DIRTY_BITMAP), "block_status_single_extent": False,
        "cache": True, "tls_psk": True}
_Q42 = {**_Q30, "info_block_size": (1, 4096, _QEMU_MAX_PAYLOAD), "multi_conn_ro": True, "fast_zero": True}
_Q52 = {**_Q42, "meta_contexts": (BASE_ALLOCATION, DIRTY_BITMAP, ALLOCATION_DEPTH)}
_Q72 = {**_Q52, "multi_conn_rw": True}
_Q82 = {**_Q72, "extended_headers": True, "block_status_payload": True}

_QEMU = [
    _qemu("2.6", unknown=("no_zeroes",), **_Q26),
    _qemu("2.8", unknown=("no_zeroes",), notes="NBD_CMD_FLAG_NO_HOLE not listed; assumed with WRITE_ZEROES.",
          **_Q28),
    _qemu("2.10", unknown=("no_zeroes", "info_block_size"),
          notes="Block size values (512/4096/32M) are those of qemu 3.0-3.1 raw images; 2.10's are not documented.",
          **_Q210),
    _qemu("2.11", unknown=("no_zeroes", "df", "info_block_size"),
          notes="SR with DATA/HOLE/ERROR chunks; no metadata contexts (LIST/SET_META_CONTEXT answered "
                "ERR_UNSUP). NBD_CMD_FLAG_DF not listed; assumed with SR.",
          **_Q211),
    _qemu("2.12", unknown=("no_zeroes", "df", "info_block_size"),
          notes="base:allocation only; the first implementation answered with a single extent (spec commit "
                "926a51d). No dirty bitmaps, no CACHE.",
          **_Q212),
    _qemu("3.0", unknown=("df",), notes="PSK, qemu:dirty-bitmap:, NBD_CMD_CACHE; min block 512 for raw.", **_Q30),
    _qemu("4.2", unknown=("df",),
          notes="MULTI_CONN for shareable read-only exports only; FAST_ZERO; min block 1 for raw since 4.0.",
          **_Q42),
    _qemu("5.2", notes="qemu:allocation-depth. Debian's 5.2 advertised 1/4096/32M, flush fua trim zero fast_zero "
                "df cache.",
          **_Q52),
    _qemu("7.2", notes="MULTI_CONN on writable (shared) exports since 7.1.", **_Q72),
    _qemu("8.2", notes="NBD_OPT_EXTENDED_HEADERS, NBD_FLAG_BLOCK_STATUS_PAYLOAD.", **_Q82),
    _qemu("10.0", notes="As 8.2; since 9.1 the server drops clients that do not finish negotiation "
                        "within 10 s (qemu b9b72cb3ce).", handshake_timeout=10.0, **_Q82),
]

# nbdkit (memory plugin, as Debian ships it).  "does not send OFFSET_HOLE or error messages (pod)".
_NBDKIT_COMMON = dict(
    offset_hole=False, error_messages=False, meta_contexts=(BASE_ALLOCATION,), extended_headers=False,
    block_status_payload=False, info_block_size=None,
)
_NBDKIT = [
    Persona(name="nbdkit-1.24", implementation="nbdkit", version="1.24", **_NBDKIT_COMMON,  # type: ignore[arg-type]
            notes="INFO_NAME/DESCRIPTION since 1.24; no NBD_INFO_BLOCK_SIZE (1.30); memory plugin "
                  "advertises multi-conn for read-only and writable exports.",
            sources="timeline.yaml (nbdkit-pod); Debian bullseye's nbdkit 1.24, probed"),
    Persona(name="nbdkit-1.32", implementation="nbdkit", version="1.32", **_NBDKIT_COMMON,  # type: ignore[arg-type]
            notes="NBD_INFO_BLOCK_SIZE exists since 1.30 but the memory plugin sends none (Debian "
                  "bookworm's 1.32, probed).",
            sources="timeline.yaml (nbdkit-pod); Debian bookworm's nbdkit 1.32, probed"),
    Persona(name="nbdkit-1.42", implementation="nbdkit", version="1.42",
            **{**_NBDKIT_COMMON, "info_block_size": (1, 32768, 0xFFFFFFFF)},  # type: ignore[arg-type]
            unknown=("offset_hole", "error_messages"),
            notes="Debian trixie's 1.42, probed: the memory plugin sends block size 1/32768/4294967295, "
                  "no extended headers. "
                  "OFFSET_HOLE / error messages are documented as unsupported only up to 1.33.11.",
            sources="Debian trixie's nbdkit 1.42, probed; timeline.yaml (nbdkit-pod-newer)"),
]

_NBD_SERVER = [
    Persona(
        name="nbd-server-3.24", implementation="nbd-server", version="3.24",
        info_name=False, info_description=False, info_block_size=None, info_size_zero=True,
        structured_replies=False, offset_hole=False, meta_contexts=(), extended_headers=False,
        block_status_payload=False, flush=False, fua=False, trim=False, fast_zero=False, df=False,
        cache=False, tls_psk=False, abort_ack=False,
        unknown=("error_messages",),
        notes="No structured replies (3.25), no meta contexts, no block size; NBD_OPT_INFO reports size 0; "
              "closes on NBD_OPT_ABORT without NBD_REP_ACK; default config offers only WRITE_ZEROES and "
              "MULTI_CONN (flush/fua/trim are config options).",
        sources="timeline.yaml (nbd-src, nbd-git); Debian bookworm's nbd-server 3.24, probed",
    ),
]

PERSONAS: dict[str, Persona] = {p.name: p for p in [_NBDREF, *_QEMU, *_NBDKIT, *_NBD_SERVER]}


def get(name: str | Persona | None) -> Persona:
    """A persona by name (KeyError lists the known ones)."""
    if isinstance(name, Persona):
        return name
    try:
        return PERSONAS[name or DEFAULT]
    except KeyError:
        raise KeyError(f"unknown persona {name!r}; known: {', '.join(PERSONAS)}") from None


def with_changes(persona: Persona, **changes: object) -> Persona:
    """A variant of a persona (e.g. ``with_changes(get(DEFAULT), offset_hole=False)``)."""
    return replace(persona, **changes)  # type: ignore[arg-type]


def format_table() -> str:
    """Text for ``--list-personas``: one line per persona, then the fields that differ from nbdref."""
    lines = []
    base = _NBDREF.as_row()
    for p in PERSONAS.values():
        row = p.as_row()
        diff = [f"{k}={v!r}" for k, v in row.items()
                if k not in ("name", "implementation", "version", "notes", "sources", "unknown") and v != base[k]]
        lines.append(f"{p.name:16} {p.implementation} {p.version}")
        if diff:
            lines.append("    differs: " + ", ".join(diff))
        if p.unknown:
            lines.append("    undocumented (assumed): " + ", ".join(p.unknown))
        if p.notes:
            lines.append("    notes: " + p.notes)
    return "\n".join(lines)
