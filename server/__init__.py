"""The HTTP server: options and errors, request schemas, OpenAI rendering, the engine client, metrics and
the routes (docs/design.md has the map). serve.py is its entry point."""
