// Publishes one chat stream to stream-credits the way a chat backend does:
// a stream.started with a reply address, then, once the worker granted a
// hold, every delta as chunk.emitted and a stream.ended. Prints the grant
// as JSON on stdout.
//
// Exit codes: 0 granted and streamed, 1 denied, 2 bad settings, 3 no
// reply within REPLY_TIMEOUT_SECONDS, 4 broker failure.
//
// Nothing here prints prompt or delta text: chats are billed, not logged.

import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";

import { connect, type ConfirmChannel, type ConsumeMessage, type Options } from "amqplib";

/** RabbitMQ's pseudo-queue for direct reply-to: the reply comes back on
 * the channel that consumes it, with no queue of our own to declare. */
const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";

/** Longest `message_id`, `user_id` and `stream_id` the worker accepts. */
const ID_CHARS_MAX = 200;

const EXIT_DENIED = 1;
const EXIT_BAD_SETTINGS = 2;
const EXIT_TIMED_OUT = 3;
const EXIT_BROKER_FAILURE = 4;

/** One message of the prompt, in OpenAI's chat form. */
interface ChatMessage {
  role: string;
  content: string;
  name?: string;
}

/** The provider's own token counts, which win over the worker's count. */
interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  cached_prompt_tokens?: number;
}

/** A chat to publish: the prompt, the model's answer as it streamed in,
 * and optionally the provider's usage. */
interface Chat {
  model: string;
  messages: ChatMessage[];
  max_output_tokens?: number;
  deltas: string[];
  usage?: Usage;
}

interface Settings {
  amqpUrl: string;
  prefix: string;
  userId: string;
  streamId: string;
  replyTimeoutSeconds: number;
  chat: Chat;
}

/** A failure that ends the program with `exitCode`. */
class Failure extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
  ) {
    super(message);
  }
}

/** Used when CHAT_FILE is unset: a short completion split the way
 * providers stream it, a few words per delta. */
const SAMPLE_CHAT: Chat = {
  model: "gpt-4o-mini",
  messages: [
    { role: "system", content: "You answer in one sentence." },
    { role: "user", content: "How does quicksort work?" },
  ],
  max_output_tokens: 256,
  deltas: [
    "Quicksort",
    " picks a pivot,",
    " moves smaller items",
    " before it and larger",
    " ones after it,",
    " then sorts both sides",
    " the same way.",
  ],
};

function badSettings(message: string): Failure {
  return new Failure(EXIT_BAD_SETTINGS, message);
}

function readId(env: NodeJS.ProcessEnv, key: string, fallback: string): string {
  const value = env[key] ?? fallback;
  if (value.length < 1 || value.length > ID_CHARS_MAX) {
    throw badSettings(`${key} must be 1 to ${ID_CHARS_MAX} characters`);
  }
  return value;
}

function readTimeoutSeconds(env: NodeJS.ProcessEnv): number {
  const text = env.REPLY_TIMEOUT_SECONDS ?? "10";
  const seconds = Number(text);
  if (!Number.isFinite(seconds) || seconds <= 0) {
    throw badSettings(`REPLY_TIMEOUT_SECONDS must be a positive number of seconds, not "${text}"`);
  }
  return seconds;
}

function isCount(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

/** Checks the shape of a chat file, naming the bad field without quoting
 * any of its text. */
function checkChat(value: unknown, path: string): Chat {
  const fail = (field: string, rule: string) => badSettings(`${path}: field "${field}" ${rule}`);
  const chat = value as Partial<Chat> | null;
  if (typeof chat !== "object" || chat === null) {
    throw badSettings(`${path} must contain a JSON object`);
  }
  if (typeof chat.model !== "string" || chat.model.length === 0) {
    throw fail("model", "must be a model name");
  }
  const messages = chat.messages;
  const validMessage = (message: ChatMessage) =>
    typeof message?.role === "string" && typeof message?.content === "string";
  if (!Array.isArray(messages) || messages.length === 0 || !messages.every(validMessage)) {
    throw fail("messages", "must be a non-empty array of {role, content}");
  }
  const deltas = chat.deltas;
  if (!Array.isArray(deltas) || !deltas.every((delta) => typeof delta === "string")) {
    throw fail("deltas", "must be an array of strings");
  }
  if (chat.max_output_tokens !== undefined && !(isCount(chat.max_output_tokens) && chat.max_output_tokens > 0)) {
    throw fail("max_output_tokens", "must be a positive integer");
  }
  const usage = chat.usage;
  if (usage !== undefined && !(isCount(usage.prompt_tokens) && isCount(usage.completion_tokens))) {
    throw fail("usage", "must have integer prompt_tokens and completion_tokens");
  }
  return chat as Chat;
}

async function readChat(path: string | undefined): Promise<Chat> {
  if (path === undefined || path === "") {
    return SAMPLE_CHAT;
  }
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    throw badSettings(`cannot read CHAT_FILE ${path}: ${(error as Error).message}`);
  }
  try {
    return checkChat(JSON.parse(text), path);
  } catch (error) {
    if (error instanceof Failure) {
      throw error;
    }
    throw badSettings(`CHAT_FILE ${path} is not valid JSON`);
  }
}

async function readSettings(env: NodeJS.ProcessEnv): Promise<Settings> {
  return {
    amqpUrl: env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f",
    prefix: readId(env, "TOPOLOGY_PREFIX", "credits"),
    userId: readId(env, "USER_ID", "node-producer"),
    streamId: readId(env, "STREAM_ID", `node-${randomUUID()}`),
    replyTimeoutSeconds: readTimeoutSeconds(env),
    chat: await readChat(env.CHAT_FILE),
  };
}

/** Returns the URL with its password replaced by `***`, for messages. */
function redact(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password !== "") {
      parsed.password = "***";
    }
    return parsed.toString();
  } catch {
    return "(unparsable AMQP_URL)";
  }
}

/** Returns the contract's properties of every inbound message:
 * persistent JSON, with the body's `message_id` repeated as the AMQP
 * property. */
function properties(messageId: string): Options.Publish {
  return {
    persistent: true,
    contentType: "application/json",
    messageId,
    mandatory: true,
  };
}

/** Publishes stream-credits messages to the events exchange. The routing
 * key is the user id, so the consistent-hash exchange sends every message
 * of a user to the same shard, in order. */
class Publisher {
  private unroutable = 0;

  constructor(
    private readonly channel: ConfirmChannel,
    private readonly exchange: string,
    private readonly userId: string,
  ) {
    // A mandatory message that reached no queue comes back here. The
    // worker declares the shard queues, so none means it is not running
    // with this prefix.
    channel.on("return", () => {
      this.unroutable += 1;
    });
  }

  send(body: Record<string, unknown>, extra: Options.Publish = {}): void {
    const message = {
      ...body,
      user_id: this.userId,
      occurred_at: new Date().toISOString(),
    };
    const content = Buffer.from(JSON.stringify(message));
    this.channel.publish(this.exchange, this.userId, content, {
      ...properties(String(body.message_id)),
      ...extra,
    });
  }

  /** Waits until the broker confirmed everything sent so far. */
  async confirm(): Promise<void> {
    await this.channel.waitForConfirms();
    if (this.unroutable > 0) {
      throw new Failure(
        EXIT_BROKER_FAILURE,
        `${this.unroutable} messages to exchange ${this.exchange} reached no queue; ` +
          "start the worker with the same topology prefix first",
      );
    }
  }
}

/** Resolves with the first reply carrying `correlationId`, or fails after
 * `timeoutSeconds`. */
async function awaitReply(
  channel: ConfirmChannel,
  correlationId: string,
  timeoutSeconds: number,
): Promise<{ reply: Promise<Record<string, unknown>>; cancel: () => void }> {
  let resolve: (reply: Record<string, unknown>) => void = () => {};
  let reject: (error: Failure) => void = () => {};
  const reply = new Promise<Record<string, unknown>>((onReply, onError) => {
    resolve = onReply;
    reject = onError;
  });
  const timer = setTimeout(() => {
    reject(new Failure(EXIT_TIMED_OUT, `no reply within ${timeoutSeconds} s; is the worker running?`));
  }, timeoutSeconds * 1000);

  // Direct reply-to needs the consumer in place before the request is
  // published, on the same channel.
  await channel.consume(
    DIRECT_REPLY_TO,
    (message: ConsumeMessage | null) => {
      if (message?.properties.correlationId === correlationId) {
        clearTimeout(timer);
        resolve(JSON.parse(message.content.toString("utf8")) as Record<string, unknown>);
      }
    },
    { noAck: true },
  );
  // A timeout while the start is still being confirmed is reported by
  // the caller's later `await`, not as an unhandled rejection.
  reply.catch(() => {});
  return { reply, cancel: () => clearTimeout(timer) };
}

/** Publishes the start, waits for the worker's decision and, on a grant,
 * streams the deltas and the end. Returns the grant. */
async function publishChat(channel: ConfirmChannel, settings: Settings): Promise<Record<string, unknown>> {
  const { chat, streamId } = settings;
  const publisher = new Publisher(channel, `${settings.prefix}.events`, settings.userId);
  const correlationId = randomUUID();
  const { reply, cancel } = await awaitReply(channel, correlationId, settings.replyTimeoutSeconds);

  const start: Record<string, unknown> = {
    type: "stream.started",
    message_id: `${streamId}-start`,
    stream_id: streamId,
    model: chat.model,
    messages: chat.messages,
  };
  if (chat.max_output_tokens !== undefined) {
    start.max_output_tokens = chat.max_output_tokens;
  }
  publisher.send(start, { replyTo: DIRECT_REPLY_TO, correlationId });
  try {
    await publisher.confirm();
  } catch (error) {
    cancel();
    throw error;
  }

  const decision = await reply;
  if (decision.type !== "reservation.granted") {
    throw new Failure(EXIT_DENIED, `denied: ${JSON.stringify(decision)}`);
  }

  // In a real backend each delta is sent as the model produces it.
  chat.deltas.forEach((delta, seq) => {
    publisher.send({
      type: "chunk.emitted",
      message_id: `${streamId}-c${seq}`,
      stream_id: streamId,
      seq,
      delta,
    });
  });
  const end: Record<string, unknown> = {
    type: "stream.ended",
    message_id: `${streamId}-end`,
    stream_id: streamId,
    status: "completed",
  };
  if (chat.usage !== undefined) {
    end.usage = chat.usage;
  }
  publisher.send(end);
  await publisher.confirm();
  return decision;
}

async function main(): Promise<number> {
  const settings = await readSettings(process.env);
  let connection;
  try {
    connection = await connect(settings.amqpUrl);
  } catch (error) {
    const reason = (error as Error).message;
    throw new Failure(EXIT_BROKER_FAILURE, `cannot connect to ${redact(settings.amqpUrl)}: ${reason}`);
  }
  // A channel error, such as a missing exchange (404), rejects the
  // pending confirms with a bare "channel closed"; the error event has
  // the broker's reason. Without a listener the emitter would end the
  // process first.
  let channelError: Error | undefined;
  connection.on("error", () => {});
  try {
    const channel = await connection.createConfirmChannel();
    channel.on("error", (error: Error) => {
      channelError = error;
    });
    const grant = await publishChat(channel, settings);
    console.log(JSON.stringify(grant));
    return 0;
  } catch (error) {
    if (channelError !== undefined && !(error instanceof Failure)) {
      throw new Failure(EXIT_BROKER_FAILURE, channelError.message);
    }
    throw error;
  } finally {
    await connection.close().catch(() => {});
  }
}

function exitCodeOf(error: unknown): number {
  if (error instanceof Failure) {
    console.error(`error: ${error.message}`);
    return error.exitCode;
  }
  console.error(`error: ${(error as Error).message ?? String(error)}`);
  return EXIT_BROKER_FAILURE;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => process.exit(exitCodeOf(error)),
);
