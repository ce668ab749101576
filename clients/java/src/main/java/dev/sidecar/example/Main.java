package dev.sidecar.example;

import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.MessageOrBuilder;
import com.google.protobuf.util.JsonFormat;
import dev.sidecar.v1.Classification;
import dev.sidecar.v1.ClassifyRequest;
import dev.sidecar.v1.ClassifyResponse;
import dev.sidecar.v1.EmbedRequest;
import dev.sidecar.v1.EmbedResponse;
import dev.sidecar.v1.Embedding;
import dev.sidecar.v1.GenerateRequest;
import dev.sidecar.v1.GenerateResponse;
import dev.sidecar.v1.InferenceGrpc;
import dev.sidecar.v1.LabelScore;
import dev.sidecar.v1.ResponseMetadata;
import dev.sidecar.v1.Usage;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import java.util.Arrays;
import java.util.Iterator;
import java.util.concurrent.TimeUnit;

/**
 * Calls a transformers-sidecar: Embed, Classify, then a streamed Generate. Dials
 * $TRANSFORMERS_SIDECAR_ADDRESS (host:port, or unix:///path/to.sock; default 127.0.0.1:50051).
 *
 * <p>Arguments, all optional: --classify-model=NAME, --generate-model=NAME, --prompt=TEXT (an
 * empty model name selects the server's default model), --json (print each reply, and each
 * failed call's status, as one JSON line instead of a summary), --deadline-ms=N (Embed's and
 * Classify's deadline, 2000 by default; it includes connecting, which the first call does).
 */
public final class Main {
  private Main() {}

  /** --json: replies and failures as JSON lines, for scripts and tests. */
  private static boolean asJson;

  /** --deadline-ms: the deadline of Embed and Classify. */
  private static long deadlineMs;

  public static void main(String[] args) throws InterruptedException {
    String classifyModel = option(args, "--classify-model=", "");
    String generateModel = option(args, "--generate-model=", "");
    String prompt = option(args, "--prompt=", "The sidecar answered");
    asJson = Arrays.asList(args).contains("--json");
    deadlineMs = Long.parseLong(option(args, "--deadline-ms=", "2000"));

    String target = System.getenv("TRANSFORMERS_SIDECAR_ADDRESS");
    if (target == null || target.isEmpty()) {
      target = "127.0.0.1:50051";
    }
    // The sidecar listens on loopback or a Unix socket inside the pod: no TLS.
    ManagedChannel channel =
        Grpc.newChannelBuilder(target, InsecureChannelCredentials.create()).build();
    boolean ok;
    try {
      InferenceGrpc.InferenceBlockingStub inference = InferenceGrpc.newBlockingStub(channel);
      ok = embed(inference);
      ok &= classify(inference, classifyModel);
      ok &= generate(inference, generateModel, prompt);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    if (!ok) {
      System.exit(1);
    }
  }

  private static String option(String[] args, String prefix, String fallback) {
    for (String arg : args) {
      if (arg.startsWith(prefix)) {
        return arg.substring(prefix.length());
      }
    }
    return fallback;
  }

  /**
   * Prints a reply as {"call": ..., "reply": ...}, the reply as JsonFormat writes it (the proto's
   * JSON mapping: lowerCamel names, enums by name, 64-bit ints as strings).
   */
  private static void emit(String call, MessageOrBuilder reply) {
    try {
      String body = JsonFormat.printer().omittingInsignificantWhitespace().print(reply);
      System.out.println("{\"call\":" + quote(call) + ",\"reply\":" + body + "}");
    } catch (InvalidProtocolBufferException e) {
      throw new IllegalStateException(e);
    }
  }

  /** A JSON string literal. */
  private static String quote(String text) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : text.toCharArray()) {
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    return out.append('"').toString();
  }

  /** Prints a failed call's gRPC status code and message. */
  private static void report(String call, StatusRuntimeException e) {
    Status status = e.getStatus();
    if (asJson) {
      String description = status.getDescription();
      String message =
          description == null || description.isEmpty() ? "" : ",\"message\":" + quote(description);
      System.out.println(
          "{\"call\":" + quote(call) + ",\"code\":" + quote(status.getCode().name()) + message
              + "}");
      return;
    }
    System.out.println(call + " failed: " + status.getCode() + ": " + status.getDescription());
  }

  private static boolean embed(InferenceGrpc.InferenceBlockingStub inference) {
    EmbedRequest request =
        EmbedRequest.newBuilder()
            .addInputs("Refund not received")
            .addInputs("App crashes on login")
            .setNormalize(true) // optional field: unset = the model's default
            .build();
    try {
      EmbedResponse reply = inference.withDeadlineAfter(deadlineMs, TimeUnit.MILLISECONDS).embed(request);
      if (asJson) {
        emit("Embed", reply);
        return true;
      }
      for (Embedding e : reply.getEmbeddingsList()) {
        System.out.println(
            "embedding: " + e.getValuesCount() + " floats, " + e.getTokenCount()
                + " tokens, truncated: " + e.getTruncated());
      }
      ResponseMetadata meta = reply.getMetadata();
      System.out.println(
          "dimensions " + reply.getDimensions() + " from " + meta.getModel() + " on "
              + meta.getDevice() + ", " + meta.getInferenceUs() + " µs");
      return true;
    } catch (StatusRuntimeException e) {
      report("Embed", e);
      return false;
    }
  }

  private static boolean classify(InferenceGrpc.InferenceBlockingStub inference, String model) {
    ClassifyRequest request =
        ClassifyRequest.newBuilder()
            .setModel(model)
            .addInputs("I was charged twice this month")
            .setTopK(3)
            .build();
    try {
      ClassifyResponse reply = inference.withDeadlineAfter(deadlineMs, TimeUnit.MILLISECONDS).classify(request);
      if (asJson) {
        emit("Classify", reply);
        return true;
      }
      for (Classification result : reply.getResultsList()) {
        for (LabelScore label : result.getLabelsList()) {
          System.out.printf("label %s %.3f%n", label.getLabel(), label.getScore());
        }
      }
      return true;
    } catch (StatusRuntimeException e) {
      // An embedding model answers FAILED_PRECONDITION here, naming the models that classify.
      report("Classify", e);
      return false;
    }
  }

  private static boolean generate(
      InferenceGrpc.InferenceBlockingStub inference, String model, String prompt) {
    GenerateRequest request =
        GenerateRequest.newBuilder()
            .setModel(model)
            .setPrompt(prompt)
            .setMaxNewTokens(32)
            .setTemperature(0f) // greedy
            .build();
    GenerateResponse last = null;
    try {
      // One message per decode step; errors surface from hasNext()/next().
      Iterator<GenerateResponse> steps =
          inference.withDeadlineAfter(60, TimeUnit.SECONDS).generate(request);
      while (steps.hasNext()) {
        last = steps.next();
        if (asJson) {
          emit("Generate", last);
        } else {
          System.out.print(last.getText());
          System.out.flush();
        }
      }
    } catch (StatusRuntimeException e) {
      // A refused request (wrong task, bad parameter) also arrives here, on the first hasNext().
      if (last != null && !asJson) {
        System.out.println();
      }
      report("Generate", e);
      return false;
    }
    if (asJson) {
      return true;
    }
    System.out.println();
    if (last == null) {
      return true;
    }
    // finish_reason, usage and metadata are set on the last message only.
    Usage usage = last.getUsage();
    System.out.println(
        "finish " + last.getFinishReason() + ", prompt " + usage.getPromptTokens()
            + " tokens, completion " + usage.getCompletionTokens() + " tokens, "
            + usage.getTruncatedPromptTokens() + " cut from the prompt, model "
            + last.getMetadata().getModel());
    return true;
  }
}
