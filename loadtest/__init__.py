"""The load-test harness: realistic traffic against any OpenAI-compatible server (`strata bench`)."""
