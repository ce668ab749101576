package dev.sidecar.example;

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
import java.util.Iterator;
import java.util.concurrent.TimeUnit;

/**
 * Calls a transformers-sidecar: Embed, Classify, then a streamed Generate. Dials
 * $TRANSFORMERS_SIDECAR_ADDRESS (host:port, or unix:///path/to.sock; default 127.0.0.1:50051).
 *
 * <p>Arguments, all optional: --classify-model=NAME, --generate-model=NAME, --prompt=TEXT (an
 * empty model name selects the server's default model).
 */
public final class Main {
  private Main() {}

  public static void main(String[] args) throws InterruptedException {
    String classifyModel = option(args, "--classify-model=", "");
    String generateModel = option(args, "--generate-model=", "");
    String prompt = option(args, "--prompt=", "The sidecar answered");

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

  /** Prints a failed call's gRPC status code and message. */
  private static void report(String call, StatusRuntimeException e) {
    Status status = e.getStatus();
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
      EmbedResponse reply = inference.withDeadlineAfter(2, TimeUnit.SECONDS).embed(request);
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
      ClassifyResponse reply = inference.withDeadlineAfter(2, TimeUnit.SECONDS).classify(request);
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
        System.out.print(last.getText());
        System.out.flush();
      }
    } catch (StatusRuntimeException e) {
      if (last != null) {
        System.out.println();
      }
      report("Generate", e);
      return false;
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
