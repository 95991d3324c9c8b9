"""Optional integrations with other engines; each module imports its engine and is never imported by the package."""
