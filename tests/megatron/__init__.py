"""The Megatron tier (a package, so that its scaffolding under ``support/`` imports as ``tests.megatron.support``)."""
