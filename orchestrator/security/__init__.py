"""Patient data protection: identity (OIDC tokens, break-glass), encryption at rest, TLS,
rate limits, SSRF checks and the security commands of the CLI."""
