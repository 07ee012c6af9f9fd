"""Device-side updates (torch-free): the signed adapter store, the install transaction, the receiver
shared by every link, and the agent that composes the links of :mod:`edgepeft.transport`."""
