"""Loading and validating what a user hands to `edgecompile build`.

Every problem a user can fix becomes an InputError with one line naming the file, the tensor
or key, the expected and the found value. Nothing here exports or rewrites anything.
"""
