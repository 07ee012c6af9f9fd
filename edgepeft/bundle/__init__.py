"""Server side: assemble, sign and archive device bundles."""
