"""Contracts shared by server and device: target profiles, the bundle manifest, verification.

Plain data and stdlib (plus ``cryptography`` for Ed25519); never imports torch,
transformers or peft, and nothing from edgepeft's server-side packages.
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
