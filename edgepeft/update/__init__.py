"""Device-side updates (torch-free): the signed adapter store, the install transaction, the agent."""
