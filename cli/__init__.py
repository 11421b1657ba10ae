"""The lowmem-merge command line: parses, prints, calls the library."""
