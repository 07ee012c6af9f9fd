"""The ``edgepeft`` command line: thin click commands loaded on demand."""
