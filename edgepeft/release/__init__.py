"""Server side: signed update packages for installed bundles, and the TUF repository devices pull from."""
