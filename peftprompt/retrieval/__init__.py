"""Open-book question answering: multi-hop questions with their paragraphs, and a passage index over them."""
