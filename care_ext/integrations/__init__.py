"""Adapters that run the framework-free CARE core inside training frameworks.

Each adapter is an optional extra: ``import care_ext`` never imports a framework, and importing an
adapter package imports its framework only when a function that needs it is called.

* :mod:`care_ext.integrations.openrlhf` - OpenRLHF 0.11.2 (pinned), sync/hybrid GRPO.
"""
