"""Kubernetes metadata pieces shared by every resource: ObjectMeta, LabelSelector, Condition.

LabelSelector follows k8s ``metav1.LabelSelectorAsSelector`` semantics: ``matchLabels`` and
every ``matchExpressions`` requirement are ANDed; an empty (non-nil) selector matches everything.
Whether a *nil* selector means "everything" or "nothing" depends on the field (Cilium differs
per field), so callers decide with ``selector is None`` before calling ``matches``.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

# Kubernetes label key: optional DNS-subdomain prefix + "/" + name (<=63 chars).
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Model(BaseModel):
    """Base for Cilium CRD specs: camelCase aliases, unknown fields rejected (the API server's
    strict field validation does the same), values populated by either name."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class LooseModel(Model):
    """Base for core objects where we read only a few fields of a much larger schema
    (``kubectl get -o yaml`` output must load): unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


# Cached: the same few label keys appear on thousands of objects.
@functools.lru_cache(maxsize=4096)
def check_label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(f"label key prefix {prefix!r} must be a DNS subdomain (lowercase, <=253)")
    if not _LABEL_NAME.match(name):
        raise ValueError(
            f"label key name {name!r} must be 1..63 chars of [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )
    return key


class LabelSelectorRequirement(Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_label_key(v)

    @model_validator(mode="after")
    def _values(self):
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} requires a non-empty values list")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in (self.values or [])
        if self.operator == "NotIn":
            # k8s: a missing key satisfies NotIn, hence Cilium's "select all" trick.
            return self.key not in labels or labels[self.key] not in (self.values or [])
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


class LabelSelector(Model):
    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v):
        for k in v or {}:
            check_label_key(k)
        return v

    def matches(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        for k, v in (self.match_labels or {}).items():
            if labels.get(k) != v:
                return False
        return all(r.matches(labels) for r in self.match_expressions or [])

    def to_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)

    def __hash__(self) -> int:   # dict fields are unhashable; selectors end up in frozen specs
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def selector_matches(selector: LabelSelector | None, labels: dict[str, str] | None,
                     *, nil_matches: bool) -> bool:
    """Apply ``selector`` to ``labels``; ``nil_matches`` says what a missing selector means."""
    if selector is None:
        return nil_matches
    return selector.matches(labels)


class OwnerReference(LooseModel):
    api_version: str | None = None
    kind: str | None = None
    name: str | None = None
    uid: str | None = None
    controller: bool | None = None


class ObjectMeta(LooseModel):
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: str | None = None
    generation: int | None = None
    uid: str | None = None
    owner_references: list[OwnerReference] | None = None

    @field_validator("labels", "annotations", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else v   # values must be strings (strict), as in Kubernetes

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_SUBDOMAIN.match(v):
            raise ValueError(f"{v[:80]!r} is not a valid name: lowercase letters, digits, '-' and "
                             "'.', starting and ending with a letter or digit (RFC 1123)")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and not (len(v) <= 63 and _DNS_LABEL.match(v)):
            raise ValueError(f"{v[:80]!r} is not a valid namespace: at most 63 lowercase "
                             "letters, digits and '-', starting and ending alphanumeric")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_label_key(key)
            if value and not (len(value) <= 63 and _LABEL_NAME.match(value)):
                raise ValueError(f"label {key}: value {value[:80]!r} must be at most 63 chars of "
                                 "[A-Za-z0-9-_.], starting and ending alphanumeric")
        return v


class Condition(LooseModel):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = None
