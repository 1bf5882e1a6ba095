"""`u2moe demo`: the whole path (corpus, prep, train, export, decode) on a generated corpus."""
