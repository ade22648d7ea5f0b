"""The click front end of kdcache (installed as the package `kdcache_cli`)."""
