"""How ranks find each other (env:// today; static lists, LAN broadcast and the rendezvous server
come with the UDP backend)."""
