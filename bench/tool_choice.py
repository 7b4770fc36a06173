"""``python -m bench.tool_choice``: how often the embedded model's AUTO choice (text or which call) is right.

Each labelled request is scored against every function of a small tool box, the way an ``AUTO`` request
is (``_Engine.relevance``). Two figures per set:

- one tool declared: the request's own function alone; right when it calls exactly for the requests
  that need that function;
- all tools declared: right when it calls the function the request needs, or none when it needs none.

``TUNING`` is the set the scoring prompt and ``CALL_THRESHOLD`` were chosen on; ``HELD_OUT`` was written
after they were fixed and measured once, so its figures are the honest estimate.
"""

from __future__ import annotations

import argparse
import time

from textgen.providers.local import LocalProvider
from textgen.providers.local_output import CALL_THRESHOLD

TOOLS = {
    "get_weather": "Get the current weather for a given location.",
    "send_email": "Send an email to a recipient with a subject and body.",
    "calculate": "Evaluate an arithmetic expression.",
    "get_stock_price": "Get the latest stock price for a ticker symbol.",
    "set_timer": "Set a countdown timer for a number of minutes.",
    "search_flights": "Search for flights between two airports on a date.",
    "translate_text": "Translate text into a target language.",
    "get_news": "Get the latest news headlines on a topic.",
    "set_light": "Turn a smart light on or off in a room.",
    "get_order_status": "Look up the status of a customer's order by order number.",
    "find_recipe": "Find a recipe for a dish.",
}

# (the function the request is asked with when one tool is declared, the request, the function it needs)
Case = tuple[str, str, str | None]

TUNING: list[Case] = [
    ("get_weather", "What is the weather in San Francisco?", "get_weather"),
    ("get_weather", "Is it raining in London right now?", "get_weather"),
    ("get_weather", "How hot is it in Tokyo today?", "get_weather"),
    ("get_weather", "Tell me a joke about cats.", None),
    ("get_weather", "Write a haiku about autumn.", None),
    ("get_weather", "What is the capital of France?", None),
    ("get_weather", "Translate 'good morning' into Spanish.", "translate_text"),
    ("send_email", "Send an email to bob@example.com saying the meeting moved to 3pm.", "send_email"),
    ("send_email", "Email my boss that I will be late.", "send_email"),
    ("send_email", "What is an email?", None),
    ("send_email", "Write a poem about the sea.", None),
    ("calculate", "What is 1234 * 5678?", "calculate"),
    ("calculate", "Compute 17 squared plus 4.", "calculate"),
    ("calculate", "Who wrote Hamlet?", None),
    ("get_stock_price", "What's Apple's stock price?", "get_stock_price"),
    ("get_stock_price", "How much is TSLA trading at?", "get_stock_price"),
    ("get_stock_price", "Tell me a story about a dragon.", None),
    ("set_timer", "Set a timer for 10 minutes.", "set_timer"),
    ("set_timer", "Remind me in 5 minutes with a timer.", "set_timer"),
    ("set_timer", "Describe the color blue.", None),
    ("search_flights", "Find me a flight from JFK to LAX next Friday.", "search_flights"),
    ("search_flights", "Are there any flights from Paris to Rome tomorrow?", "search_flights"),
    ("search_flights", "Why is the sky blue?", None),
    ("search_flights", "Write a limerick about a frog.", None),
    ("translate_text", "Translate 'thank you very much' into German.", "translate_text"),
    ("translate_text", "How do you say hello in Japanese?", "translate_text"),
    ("translate_text", "What is 7 times 8?", "calculate"),
    ("get_news", "What's the latest news about electric cars?", "get_news"),
    ("get_news", "Any headlines about the election today?", "get_news"),
    ("get_news", "Explain how photosynthesis works.", None),
    ("set_light", "Turn off the light in the kitchen.", "set_light"),
    ("set_light", "Switch on the bedroom lights.", "set_light"),
    ("set_light", "Tell me a fun fact about octopuses.", None),
    ("get_order_status", "Where is my order 12345?", "get_order_status"),
    ("get_order_status", "Has order A-778 shipped yet?", "get_order_status"),
    ("get_order_status", "Summarize the plot of Romeo and Juliet.", None),
    ("find_recipe", "How do I make lasagna?", "find_recipe"),
    ("find_recipe", "Give me a recipe for pancakes.", "find_recipe"),
    ("find_recipe", "What year did World War II end?", None),
    ("get_weather", "What's the temperature in Berlin?", "get_weather"),
    ("get_weather", "Will it snow in Denver tomorrow?", "get_weather"),
    ("get_weather", "Hello! How are you?", None),
    ("get_weather", "Write a poem about the moon.", None),
    ("send_email", "Can you write a short bio for me?", None),
    ("calculate", "What is the square root of 144?", "calculate"),
    ("calculate", "Say something nice.", None),
    ("get_stock_price", "Explain what a stock is.", None),
    ("set_timer", "What time is it in Paris?", None),
]

TUNING += [
    ("get_weather", "Do I need an umbrella in Seattle today?", "get_weather"),
    ("get_weather", "What's the forecast for Madrid this weekend?", "get_weather"),
    ("get_weather", "Give me three tips for a job interview.", None),
    ("send_email", "Write to alice@example.com and tell her the report is ready.", "send_email"),
    ("send_email", "What rhymes with orange?", None),
    ("calculate", "How much is 15% of 240?", "calculate"),
    ("calculate", "Name three famous painters.", None),
    ("get_stock_price", "What is Microsoft stock worth today?", "get_stock_price"),
    ("get_stock_price", "Describe a sunset over the ocean.", None),
    ("set_timer", "Start a 20 minute timer for the pasta.", "set_timer"),
    ("set_timer", "What is the tallest mountain in the world?", None),
    ("search_flights", "Book me on a flight from Boston to Chicago on Monday.", "search_flights"),
    ("search_flights", "What does a pilot do?", None),
    ("translate_text", "Translate 'where is the station' into French.", "translate_text"),
    ("translate_text", "Write a short motivational quote.", None),
    ("get_news", "What happened in the stock market news today?", "get_news"),
    ("get_news", "How many legs does a spider have?", None),
    ("set_light", "Dim the living room lights.", "set_light"),
    ("set_light", "Tell me about the history of Rome.", None),
    ("get_order_status", "Can you check on order 99812 for me?", "get_order_status"),
    ("get_order_status", "What is your favourite colour?", None),
    ("find_recipe", "I want to cook chicken curry tonight, how?", "find_recipe"),
    ("find_recipe", "Who painted the Mona Lisa?", None),
    ("get_weather", "Good night!", None),
]

HELD_OUT: list[Case] = [
    ("get_weather", "Is it sunny in Barcelona at the moment?", "get_weather"),
    ("get_weather", "How windy is it in Chicago?", "get_weather"),
    ("get_weather", "What is your name?", None),
    ("send_email", "Send a message by email to the team about Friday's party.", "send_email"),
    ("send_email", "Explain the rules of chess.", None),
    ("calculate", "What is 98 divided by 7?", "calculate"),
    ("calculate", "Suggest a name for a puppy.", None),
    ("get_stock_price", "Check the share price of Amazon.", "get_stock_price"),
    ("get_stock_price", "Write a sentence using the word 'river'.", None),
    ("set_timer", "Set an alarm timer for 45 minutes.", "set_timer"),
    ("set_timer", "List the planets of the solar system.", None),
    ("search_flights", "Show me flights from London to New York on June 3.", "search_flights"),
    ("search_flights", "Tell me a riddle.", None),
    ("translate_text", "Translate 'I love books' into Italian.", "translate_text"),
    ("translate_text", "What is the boiling point of water?", None),
    ("get_news", "Give me today's top headlines about sports.", "get_news"),
    ("get_news", "Write a thank-you note to my teacher.", None),
    ("set_light", "Turn on the lamp in the office.", "set_light"),
    ("set_light", "What do cows eat?", None),
    ("get_order_status", "What is the status of my order 5521?", "get_order_status"),
    ("get_order_status", "Write a tongue twister.", None),
    ("find_recipe", "Find me a recipe for banana bread.", "find_recipe"),
    ("find_recipe", "Who discovered penicillin?", None),
    ("get_weather", "Thanks, that's all.", None),
]


def evaluate(provider: LocalProvider, cases: list[Case]) -> tuple[int, int, list[str]]:
    engine = provider.engines[0]
    single = every = 0
    wrong: list[str] = []
    for own, query, needed in cases:
        scores = engine.relevance(query, TOOLS)
        one_right = (scores[own] > CALL_THRESHOLD) == (needed == own)
        best = max(scores, key=lambda name: scores[name])
        chosen = best if scores[best] > CALL_THRESHOLD else None
        single += one_right
        every += chosen == needed
        if not one_right or chosen != needed:
            wrong.append(f"  {query!r}: needs {needed}, one tool {scores[own]:+.2f}, all tools -> {chosen}")
    return single, every, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--verbose", action="store_true", help="list every request it gets wrong")
    args = parser.parse_args()
    provider = LocalProvider(instances=1)
    provider.load()
    print(f"threshold {CALL_THRESHOLD} nats/token, {len(TOOLS)} tools in the box")
    for name, cases in (("tuning", TUNING), ("held out", HELD_OUT)):
        started = time.perf_counter()
        single, every, wrong = evaluate(provider, cases)
        per_request = (time.perf_counter() - started) / len(cases) / (len(TOOLS) + 1) * 2
        print(
            f"{name}: {len(cases)} requests; one tool declared {single}/{len(cases)} right "
            f"({single / len(cases):.0%}); all {len(TOOLS)} declared {every}/{len(cases)} right "
            f"({every / len(cases):.0%}); choice with one tool ~{per_request * 1000:.0f} ms"
        )
        if args.verbose:
            print("\n".join(wrong))


if __name__ == "__main__":
    main()
