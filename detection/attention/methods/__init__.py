"""Explanation methods behind one interface (`base.ExplanationMethod`) and their one table
(`registry.METHODS`): which apply to a detector, and the refusal naming the family."""
from __future__ import annotations

from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodContext, MethodMaps,
                                              MethodNotApplicable, MethodOptions, Targets, attention_kind,
                                              model_family)
from detection.attention.methods.drise import Drise
from detection.attention.methods.gradient import AttnGrad, Relevance
from detection.attention.methods.raw import RawAttention, choice_name
from detection.attention.methods.table import (DEFAULT_METHOD, METHODS, applicable_methods, check_methods,
                                                  check_names, parse_methods)
from detection.attention.methods.rollout import AttentionRollout

__all__ = ["DEFAULT_METHOD", "METHODS", "AttentionRollout", "AttnGrad", "Drise", "ExplanationMethod", "ImageInput",
           "MethodContext", "MethodMaps", "MethodNotApplicable", "MethodOptions", "RawAttention", "Relevance",
           "Targets", "applicable_methods", "attention_kind", "check_methods", "check_names", "choice_name",
           "model_family", "parse_methods"]
