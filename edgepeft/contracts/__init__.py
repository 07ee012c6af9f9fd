"""Contracts shared by server and device: what both sides read byte for byte, and the rules for trusting it.

Formats: the bundle manifest, target profiles, update envelopes, jobs, signed device reports, adapter
payloads, health checks, labelled-data files. Trust: Ed25519 signing and verification, device identities,
names, safe archives, JSON from a peer (:mod:`.jsontext`). Plain data and stdlib (plus ``cryptography``
for Ed25519); never imports torch, transformers or peft, nor any other package of edgepeft (only the
shared leaves ``errors`` and ``fsio``).
"""

from .manifest import (
                       MANIFEST_NAME,
                       MANIFEST_SCHEMA_VERSION,
                       AdapterEntry,
                       FileEntry,
                       HealthCheck,
                       Manifest,
                       Signature,
                       canonical_bytes,
)
from .target import TARGET_SCHEMA_VERSION, Budgets, QuantSpec, TargetProfile, UpdateLink, list_targets, load_target
from .verify import key_id, load_public_key, sha256_file, verify_bundle, verify_files, verify_signature

__all__ = [
    "MANIFEST_NAME", "MANIFEST_SCHEMA_VERSION", "AdapterEntry", "FileEntry", "HealthCheck", "Manifest",
    "Signature", "canonical_bytes", "TARGET_SCHEMA_VERSION", "Budgets", "QuantSpec", "TargetProfile",
    "UpdateLink", "list_targets", "load_target", "key_id", "load_public_key", "sha256_file", "verify_bundle",
    "verify_files", "verify_signature",
]
