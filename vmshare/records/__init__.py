"""What vmshare keeps on disk: the audit log of every change (``audit``) and
the savings history (``history``).

May import model and errors only.
"""
