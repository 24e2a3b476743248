"""
What the etcd backend makes of the keys and values under its prefix.

kvconfig writes the etcd key ``PREFIX + key`` (UTF-8) holding the value's
tagged JSON (kvconfig.values).  Other programs sharing the cluster may put
anything under the prefix, and kvconfig still serves what it can:

- a key that is not a valid kvconfig key (not UTF-8, whitespace, too long)
  is skipped and counted (``etcd_skipped_keys``);
- a value that is not tagged JSON every interface can carry is served as
  its text, or as bytes when it is not UTF-8, and counted
  (``etcd_foreign_values``).
"""

from __future__ import annotations

from twisted.logger import Logger

from kvconfig import values
from kvconfig.backends.etcd.client import b64, unb64
from kvconfig.errors import KVConfigError
from kvconfig.limits import Limits
from kvconfig.model import KeyValue


class Codec:
    """kvconfig keys and values to and from etcd's, under one prefix."""

    log = Logger()

    def __init__(self, prefix: bytes, limits: Limits) -> None:
        self.prefix = prefix
        self.limits = limits
        self.skipped_keys = 0
        self.foreign_values = 0

    def etcd_key(self, key: str) -> str:
        """The gateway's (base64) form of the etcd key holding *key*."""
        return b64(self.prefix + key.encode("utf-8"))

    def key(self, kv: dict) -> str | None:
        """The kvconfig key of an etcd key-value under the prefix, or None
        if another writer put a key there that kvconfig cannot serve."""
        etcd_key = unb64(kv["key"])
        try:
            key = etcd_key[len(self.prefix):].decode("utf-8")
            return values.check_key(key, self.limits.max_key_bytes)
        except (UnicodeDecodeError, KVConfigError):
            self.skipped_keys += 1
            self.log.warn("skipped etcd key {key!r}: not a valid kvconfig key", key=etcd_key)
            return None

    def key_value(self, key: str, kv: dict, own: bytes | None = None) -> KeyValue:
        """The KeyValue of *key*, from etcd's key-value *kv*.  *own* is the
        encoded value of this node's put of the key in flight: when etcd
        holds that same value, checked when the put was made, it is not
        checked again."""
        raw = unb64(kv.get("value", ""))
        if own is None or own != raw:
            raw = self.value(raw)
        return KeyValue(key=key, raw=raw, version=int(kv.get("version", 0)),
                        create_revision=int(kv.get("create_revision", 0)),
                        mod_revision=int(kv.get("mod_revision", 0)))

    def value(self, raw: bytes) -> bytes:
        """The tagged JSON kvconfig serves for an etcd value under the prefix:
        the value itself if it is one every interface carries, else (a value
        another program wrote) its text, or its bytes."""
        limits = self.limits
        try:
            # kvconfig's own values are canonical; a JSON value another
            # writer put there must still be one every interface carries
            # (a 32-bit int, no NaN, no lone surrogate ...).
            values.encode(values.decode(raw), max(len(raw), limits.max_value_bytes),
                          limits.max_value_depth)
            return raw
        except (ValueError, RecursionError, KVConfigError):
            pass
        # Written by something other than kvconfig: served as its text (or
        # bytes when it is not text kvconfig can carry), re-encoded so that
        # every interface carries it alike.
        self.foreign_values += 1
        try:
            text = raw.decode("utf-8")
            return values.encode(text, len(raw) * 8 + 64, limits.max_value_depth)
        except (UnicodeDecodeError, KVConfigError):
            return values.encode(raw, len(raw) * 2 + 64, limits.max_value_depth)
