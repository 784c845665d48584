"""callmon reflector: the call target that echoes media, with fault injection."""
