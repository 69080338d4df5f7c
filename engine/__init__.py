"""The generation engine: sampling parameters, a request's state, the scheduler, the model runner, the
sampler and the engine that steps them (docs/design.md has the map)."""
